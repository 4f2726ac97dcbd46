//! What a send, an update and a recall pass before they may spend any quota: Feishu's
//! `receive_id_type` values, the receiver's id, the types a message can be updated to.

use super::{MAX_UUID_CHARS, MsgType, ValidationError, check_id, optional_id, validate_content};

/// Feishu's `receive_id_type` values of the send endpoint.
pub const RECEIVE_ID_TYPES: [&str; 5] = ["chat_id", "open_id", "user_id", "union_id", "email"];

/// Longest email accepted as a `receive_id` (RFC 5321's limit).
const MAX_EMAIL_CHARS: usize = 254;

/// `s` as one of [`RECEIVE_ID_TYPES`].
pub fn receive_id_type(s: &str) -> Option<&'static str> {
    RECEIVE_ID_TYPES.into_iter().find(|t| *t == s)
}

/// A validated send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Send {
    pub receive_id_type: &'static str,
    pub receive_id: String,
    pub msg_type: MsgType,
    pub content: String,
    /// The caller's uuid, if any.
    pub uuid: Option<String>,
}

/// A send's fields as they arrive.
#[derive(Clone, Debug, Default)]
pub struct RawSend<'a> {
    pub receive_id_type: &'a str,
    pub receive_id: &'a str,
    pub msg_type: &'a str,
    pub content: &'a str,
    pub uuid: &'a str,
}

impl RawSend<'_> {
    pub fn validate(&self) -> Result<Send, ValidationError> {
        let receive_id_type = receive_id_type(self.receive_id_type).ok_or_else(|| {
            ValidationError::ReceiveIdType(self.receive_id_type.chars().take(64).collect())
        })?;
        let bad = |why: String| ValidationError::BadId {
            field: "receive_id",
            why,
        };
        if self.receive_id.is_empty() {
            return Err(bad("empty".into()));
        }
        if receive_id_type == "email" {
            // Goes in the JSON body, not a URL: a plain address is enough.
            let chars = self.receive_id.chars().count();
            if chars > MAX_EMAIL_CHARS
                || self.receive_id.matches('@').count() != 1
                || self
                    .receive_id
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(bad("not an email address".into()));
            }
        } else {
            check_id("receive_id", self.receive_id)?;
        }
        let msg_type: MsgType = self.msg_type.parse()?;
        let uuid_chars = self.uuid.chars().count();
        if uuid_chars > MAX_UUID_CHARS {
            return Err(ValidationError::UuidTooLong(uuid_chars));
        }
        validate_content(msg_type, self.content)?;
        Ok(Send {
            receive_id_type,
            receive_id: self.receive_id.to_owned(),
            msg_type,
            content: self.content.to_owned(),
            uuid: (!self.uuid.is_empty()).then(|| self.uuid.to_owned()),
        })
    }
}

/// A validated update (`msg_type` set) or recall (`msg_type` None) of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub message_id: String,
    /// interactive (PATCH), text or post (PUT); None for a recall.
    pub msg_type: Option<MsgType>,
    pub content: String,
    /// The message's chat, when the caller named it.
    pub chat_id: Option<String>,
}

/// An update's or a recall's fields as they arrive (a recall has no type and no content).
#[derive(Clone, Debug, Default)]
pub struct RawUpdate<'a> {
    pub message_id: &'a str,
    pub msg_type: Option<&'a str>,
    pub content: &'a str,
    pub chat_id: &'a str,
}

impl RawUpdate<'_> {
    pub fn validate(&self) -> Result<Update, ValidationError> {
        if self.message_id.is_empty() {
            return Err(ValidationError::EmptyMessageId);
        }
        check_id("message_id", self.message_id)?;
        let chat_id = optional_id("chat_id", self.chat_id)?;
        let msg_type = match self.msg_type {
            None => None,
            Some(t) => {
                let t: MsgType = t.parse()?;
                if !matches!(t, MsgType::Interactive | MsgType::Text | MsgType::Post) {
                    return Err(ValidationError::NotUpdatable(t));
                }
                validate_content(t, self.content)?;
                Some(t)
            }
        };
        Ok(Update {
            message_id: self.message_id.to_owned(),
            msg_type,
            content: self.content.to_owned(),
            chat_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_name_a_known_receiver() {
        let ok = RawSend {
            receive_id_type: "chat_id",
            receive_id: "oc_1",
            msg_type: "text",
            content: r#"{"text":"hi"}"#,
            uuid: "",
        };
        assert_eq!(ok.validate().unwrap().receive_id_type, "chat_id");
        let email = RawSend {
            receive_id_type: "email",
            receive_id: "a.b@example.com",
            ..ok.clone()
        };
        assert!(email.validate().is_ok());
        let bad_type = RawSend {
            receive_id_type: "chat",
            ..ok.clone()
        };
        assert_eq!(bad_type.validate().unwrap_err().field(), "receive_id_type");
        let slash = RawSend {
            receive_id: "oc_1/../x",
            ..ok.clone()
        };
        assert_eq!(slash.validate().unwrap_err().field(), "receive_id");
        let empty = RawSend {
            receive_id: "",
            ..ok
        };
        assert_eq!(empty.validate().unwrap_err().reason(), "INVALID_ID");
    }

    #[test]
    fn only_cards_texts_and_posts_are_updated() {
        let card = RawUpdate {
            message_id: "om_1",
            msg_type: Some("interactive"),
            content: r#"{"elements":[]}"#,
            chat_id: "",
        };
        assert_eq!(
            card.validate().unwrap().msg_type,
            Some(MsgType::Interactive)
        );
        let image = RawUpdate {
            msg_type: Some("image"),
            content: r#"{"image_key":"k"}"#,
            ..card.clone()
        };
        assert_eq!(image.validate().unwrap_err().reason(), "INVALID_MSG_TYPE");
        let recall = RawUpdate {
            msg_type: None,
            content: "",
            ..card
        };
        assert_eq!(recall.validate().unwrap().msg_type, None);
    }
}
