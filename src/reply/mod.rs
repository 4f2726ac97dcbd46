//! The message domain: Feishu's message types and the validation a reply passes before it
//! may spend any quota (`reply::message`: a send, an update, a recall). No transport types
//! here (no tonic, no reqwest).

mod message;

pub use message::{RECEIVE_ID_TYPES, RawSend, RawUpdate, Send, Update, receive_id_type};

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

/// Longest uuid Feishu accepts (its documented limit).
pub const MAX_UUID_CHARS: usize = 50;
/// Text reply body limit (Feishu: 150 KB).
pub const MAX_TEXT_BYTES: usize = 150 * 1024;
/// Post and interactive (card) body limit (Feishu: 30 KB).
pub const MAX_RICH_BYTES: usize = 30 * 1024;
/// Any other content: Feishu documents no limit for keys-only types; anything this large is a bug.
pub const MAX_OTHER_BYTES: usize = 150 * 1024;
/// Longest message_id / chat_id / user_id accepted. Real ids are ~35 chars.
pub const MAX_ID_CHARS: usize = 128;

/// Feishu's ten `msg_type` values for the reply endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    Text,
    Post,
    Image,
    File,
    Audio,
    Media,
    Sticker,
    Interactive,
    ShareChat,
    ShareUser,
}

impl MsgType {
    pub const ALL: [MsgType; 10] = [
        MsgType::Text,
        MsgType::Post,
        MsgType::Image,
        MsgType::File,
        MsgType::Audio,
        MsgType::Media,
        MsgType::Sticker,
        MsgType::Interactive,
        MsgType::ShareChat,
        MsgType::ShareUser,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MsgType::Text => "text",
            MsgType::Post => "post",
            MsgType::Image => "image",
            MsgType::File => "file",
            MsgType::Audio => "audio",
            MsgType::Media => "media",
            MsgType::Sticker => "sticker",
            MsgType::Interactive => "interactive",
            MsgType::ShareChat => "share_chat",
            MsgType::ShareUser => "share_user",
        }
    }

    /// The largest content (bytes of the JSON string) Feishu accepts for this type.
    pub fn max_content_bytes(self) -> usize {
        match self {
            MsgType::Text => MAX_TEXT_BYTES,
            MsgType::Post | MsgType::Interactive => MAX_RICH_BYTES,
            _ => MAX_OTHER_BYTES,
        }
    }
}

impl fmt::Display for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MsgType {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        MsgType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ValidationError::MsgType(s.chars().take(64).collect()))
    }
}

/// Why a reply was refused before any quota was spent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("message_id is empty")]
    EmptyMessageId,
    #[error("{field} is malformed: {why}")]
    BadId { field: &'static str, why: String },
    #[error(
        "msg_type {0:?} is not one of Feishu's: text, post, image, file, audio, media, sticker, interactive, share_chat, share_user"
    )]
    MsgType(String),
    #[error("content is not valid JSON: {0}")]
    NotJson(String),
    #[error("content must be a JSON object for msg_type {0}")]
    NotObject(MsgType),
    #[error("content for msg_type {msg_type} {why}")]
    Shape { msg_type: MsgType, why: String },
    #[error("content is {size} bytes; Feishu accepts at most {max} bytes for msg_type {msg_type}")]
    TooLarge {
        msg_type: MsgType,
        size: usize,
        max: usize,
    },
    #[error("uuid is {0} characters; Feishu accepts at most 50")]
    UuidTooLong(usize),
    #[error("ttl_s is {0}; at most 3000 (Feishu dedupes a uuid for an hour)")]
    Ttl(u32),
    #[error(
        "receive_id_type {0:?} is not one of Feishu's: chat_id, open_id, user_id, union_id, email"
    )]
    ReceiveIdType(String),
    #[error(
        "a message of msg_type {0} cannot be updated: only interactive (a card), text and post"
    )]
    NotUpdatable(MsgType),
}

impl ValidationError {
    /// The `google.rpc.ErrorInfo` reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            ValidationError::EmptyMessageId | ValidationError::BadId { .. } => "INVALID_ID",
            ValidationError::MsgType(_) | ValidationError::NotUpdatable(_) => "INVALID_MSG_TYPE",
            ValidationError::ReceiveIdType(_) => "INVALID_ID",
            ValidationError::UuidTooLong(_) => "INVALID_UUID",
            ValidationError::Ttl(_) => "INVALID_TTL",
            ValidationError::TooLarge { .. } => "CONTENT_TOO_LARGE",
            _ => "INVALID_CONTENT",
        }
    }

    /// The request field the error is about (for `google.rpc.BadRequest`).
    pub fn field(&self) -> &'static str {
        match self {
            ValidationError::EmptyMessageId => "message_id",
            ValidationError::BadId { field, .. } => field,
            ValidationError::MsgType(_) | ValidationError::NotUpdatable(_) => "msg_type",
            ValidationError::ReceiveIdType(_) => "receive_id_type",
            ValidationError::UuidTooLong(_) => "uuid",
            ValidationError::Ttl(_) => "ttl_s",
            _ => "content",
        }
    }
}

/// A validated reply, ready to be queued. Ids are checked, content matches its msg_type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub message_id: String,
    pub msg_type: MsgType,
    pub content: String,
    pub reply_in_thread: bool,
    /// The caller's uuid, if any (the scheduler generates one per job otherwise).
    pub uuid: Option<String>,
    pub chat_id: Option<String>,
    pub user_id: Option<String>,
}

/// Unvalidated fields as they arrive from a caller.
#[derive(Clone, Debug, Default)]
pub struct RawReply<'a> {
    pub message_id: &'a str,
    pub msg_type: &'a str,
    pub content: &'a str,
    pub reply_in_thread: bool,
    pub uuid: &'a str,
    pub chat_id: &'a str,
    pub user_id: &'a str,
}

impl RawReply<'_> {
    /// Checks everything Feishu would reject for shape, so no quota is spent on a doomed reply.
    pub fn validate(&self) -> Result<Reply, ValidationError> {
        if self.message_id.is_empty() {
            return Err(ValidationError::EmptyMessageId);
        }
        check_id("message_id", self.message_id)?;
        let chat_id = optional_id("chat_id", self.chat_id)?;
        let user_id = optional_id("user_id", self.user_id)?;
        let msg_type: MsgType = self.msg_type.parse()?;
        let uuid_chars = self.uuid.chars().count();
        if uuid_chars > MAX_UUID_CHARS {
            return Err(ValidationError::UuidTooLong(uuid_chars));
        }
        validate_content(msg_type, self.content)?;
        Ok(Reply {
            message_id: self.message_id.to_owned(),
            msg_type,
            content: self.content.to_owned(),
            reply_in_thread: self.reply_in_thread,
            uuid: (!self.uuid.is_empty()).then(|| self.uuid.to_owned()),
            chat_id,
            user_id,
        })
    }
}

pub(crate) fn optional_id(
    field: &'static str,
    id: &str,
) -> Result<Option<String>, ValidationError> {
    if id.is_empty() {
        return Ok(None);
    }
    check_id(field, id)?;
    Ok(Some(id.to_owned()))
}

/// Feishu ids are short ASCII tokens (`om_…`, `oc_…`, `ou_…`); they go into a URL path, so
/// anything with separators, spaces or control characters is refused here.
pub(crate) fn check_id(field: &'static str, id: &str) -> Result<(), ValidationError> {
    if id.len() > MAX_ID_CHARS {
        return Err(ValidationError::BadId {
            field,
            why: format!("{} bytes, longer than {MAX_ID_CHARS}", id.len()),
        });
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(ValidationError::BadId {
            field,
            why: format!("character {c:?} is not allowed (expected letters, digits, '_' or '-')"),
        });
    }
    Ok(())
}

/// Validates `content` for `msg_type`: JSON object, the type's required keys, the size limit.
pub fn validate_content(msg_type: MsgType, content: &str) -> Result<(), ValidationError> {
    let max = msg_type.max_content_bytes();
    if content.len() > max {
        return Err(ValidationError::TooLarge {
            msg_type,
            size: content.len(),
            max,
        });
    }
    let value: Value =
        serde_json::from_str(content).map_err(|e| ValidationError::NotJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ValidationError::NotObject(msg_type));
    };
    let shape = |why: String| ValidationError::Shape { msg_type, why };
    match msg_type {
        MsgType::Text => require_str(&obj, "text").map_err(shape),
        MsgType::Image => require_str(&obj, "image_key").map_err(shape),
        MsgType::File | MsgType::Audio | MsgType::Sticker | MsgType::Media => {
            require_str(&obj, "file_key").map_err(shape)
        }
        MsgType::ShareChat => require_str(&obj, "chat_id").map_err(shape),
        MsgType::ShareUser => require_str(&obj, "user_id").map_err(shape),
        MsgType::Post => validate_post(&obj).map_err(shape),
        MsgType::Interactive => validate_card(&obj).map_err(shape),
    }
}

fn require_str(obj: &Map<String, Value>, key: &str) -> Result<(), String> {
    match obj.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(()),
        Some(Value::String(_)) => Err(format!("has an empty \"{key}\"")),
        Some(_) => Err(format!("needs \"{key}\" to be a string")),
        None => Err(format!("needs a \"{key}\" key")),
    }
}

/// post: `{"<locale>": {"title"?: string, "content": [[{"tag": ...}, ...], ...]}, ...}`.
/// Feishu also accepts the locale body directly (`{"title", "content"}`) for the reply API.
fn validate_post(obj: &Map<String, Value>) -> Result<(), String> {
    if obj.is_empty() {
        return Err("needs at least one locale, e.g. {\"zh_cn\": {\"content\": [[...]]}}".into());
    }
    if obj.contains_key("content") {
        return validate_post_body("post", obj);
    }
    for (locale, body) in obj {
        let Value::Object(body) = body else {
            return Err(format!("needs locale \"{locale}\" to be an object"));
        };
        validate_post_body(locale, body)?;
    }
    Ok(())
}

fn validate_post_body(locale: &str, body: &Map<String, Value>) -> Result<(), String> {
    if let Some(title) = body.get("title")
        && !title.is_string()
    {
        return Err(format!("needs \"{locale}.title\" to be a string"));
    }
    let Some(Value::Array(paragraphs)) = body.get("content") else {
        return Err(format!(
            "needs \"{locale}.content\" to be an array of paragraphs"
        ));
    };
    for (i, p) in paragraphs.iter().enumerate() {
        let Value::Array(elems) = p else {
            return Err(format!(
                "needs \"{locale}.content[{i}]\" to be an array of elements"
            ));
        };
        for (j, e) in elems.iter().enumerate() {
            match e.get("tag") {
                Some(Value::String(_)) => {}
                _ => {
                    return Err(format!(
                        "needs \"{locale}.content[{i}][{j}]\" to be an object with a \"tag\""
                    ));
                }
            }
        }
    }
    Ok(())
}

/// interactive: a card object (`elements`, `header`, `body`, `i18n_elements`, `schema`, …), the
/// template form `{"type":"template","data":{"template_id": …}}`, or a CardKit card entity
/// `{"type":"card","data":{"card_id": …}}`.
fn validate_card(obj: &Map<String, Value>) -> Result<(), String> {
    // A CardKit card entity: `{"type":"card","data":{"card_id": …}}`.
    if obj.get("type").and_then(Value::as_str) == Some("card") {
        let Some(Value::Object(data)) = obj.get("data") else {
            return Err("card entity form needs a \"data\" object".into());
        };
        return require_str(data, "card_id")
            .map_err(|e| format!("card entity form {e} in \"data\""));
    }
    if obj.get("type").and_then(Value::as_str) == Some("template") {
        let Some(Value::Object(data)) = obj.get("data") else {
            return Err("template form needs a \"data\" object".into());
        };
        require_str(data, "template_id").map_err(|e| format!("template form {e} in \"data\""))?;
        if let Some(v) = data.get("template_variable")
            && !v.is_object()
        {
            return Err("needs \"data.template_variable\" to be an object".into());
        }
        return Ok(());
    }
    const CARD_KEYS: [&str; 7] = [
        "elements",
        "i18n_elements",
        "header",
        "body",
        "schema",
        "config",
        "card_link",
    ];
    if CARD_KEYS.iter().any(|k| obj.contains_key(*k)) {
        Ok(())
    } else {
        Err("is neither a card (no \"elements\", \"body\", \"header\" or \"schema\") nor a template (\"type\":\"template\")".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw<'a>(msg_type: &'a str, content: &'a str) -> RawReply<'a> {
        RawReply {
            message_id: "om_abc123",
            msg_type,
            content,
            ..Default::default()
        }
    }

    #[test]
    fn accepts_every_type_in_its_minimal_form() {
        let ok = [
            ("text", r#"{"text":"hi <at user_id=\"ou_1\">x</at>"}"#),
            (
                "post",
                r#"{"zh_cn":{"title":"t","content":[[{"tag":"text","text":"a"}]]}}"#,
            ),
            (
                "post",
                r#"{"title":"t","content":[[{"tag":"text","text":"a"}]]}"#,
            ),
            ("image", r#"{"image_key":"img_v2_1"}"#),
            ("file", r#"{"file_key":"file_v2_1"}"#),
            ("audio", r#"{"file_key":"file_v2_1"}"#),
            ("media", r#"{"file_key":"file_v2_1","image_key":"img_1"}"#),
            ("sticker", r#"{"file_key":"file_v2_1"}"#),
            ("interactive", r#"{"elements":[]}"#),
            (
                "interactive",
                r#"{"type":"template","data":{"template_id":"ctp_1"}}"#,
            ),
            (
                "interactive",
                r#"{"type":"card","data":{"card_id":"7355372766134157313"}}"#,
            ),
            ("share_chat", r#"{"chat_id":"oc_1"}"#),
            ("share_user", r#"{"user_id":"ou_1"}"#),
        ];
        for (t, c) in ok {
            raw(t, c)
                .validate()
                .unwrap_or_else(|e| panic!("{t} {c}: {e}"));
        }
    }

    #[test]
    fn refuses_each_kind_of_bad_input_with_a_precise_error() {
        let cases: [(RawReply, &str); 13] = [
            (
                RawReply {
                    message_id: "",
                    ..raw("text", r#"{"text":"a"}"#)
                },
                "message_id is empty",
            ),
            (
                RawReply {
                    message_id: "om_1/../x",
                    ..raw("text", r#"{"text":"a"}"#)
                },
                "message_id is malformed",
            ),
            (raw("txt", r#"{"text":"a"}"#), "msg_type \"txt\""),
            (raw("text", "hello"), "not valid JSON"),
            (raw("text", "[1]"), "must be a JSON object"),
            (raw("text", r#"{"txt":"a"}"#), "needs a \"text\" key"),
            (
                raw("image", r#"{"image_key":3}"#),
                "\"image_key\" to be a string",
            ),
            (raw("file", r#"{"image_key":"x"}"#), "\"file_key\""),
            (raw("post", r#"{"zh_cn":{"title":"t"}}"#), "zh_cn.content"),
            (
                raw("interactive", r#"{"type":"template","data":{}}"#),
                "template_id",
            ),
            (raw("interactive", r#"{"foo":1}"#), "neither a card"),
            (
                raw("interactive", r#"{"type":"card","data":{"id":"x"}}"#),
                "card_id",
            ),
            (
                RawReply {
                    uuid: &"u".repeat(51),
                    ..raw("text", r#"{"text":"a"}"#)
                },
                "uuid is 51 characters",
            ),
        ];
        for (r, want) in cases {
            let err = r.validate().expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn size_limits_follow_the_msg_type() {
        let big_text = format!(r#"{{"text":"{}"}}"#, "a".repeat(MAX_TEXT_BYTES));
        assert!(matches!(
            raw("text", &big_text).validate(),
            Err(ValidationError::TooLarge {
                max: MAX_TEXT_BYTES,
                ..
            })
        ));
        let text_40k = format!(r#"{{"text":"{}"}}"#, "a".repeat(40 * 1024));
        assert!(raw("text", &text_40k).validate().is_ok());
        let card_40k = format!(r#"{{"elements":[],"x":"{}"}}"#, "a".repeat(40 * 1024));
        assert!(matches!(
            raw("interactive", &card_40k).validate(),
            Err(ValidationError::TooLarge {
                max: MAX_RICH_BYTES,
                ..
            })
        ));
    }

    #[test]
    fn empty_optional_fields_become_none() {
        let r = raw("text", r#"{"text":"a"}"#).validate().unwrap();
        assert_eq!((r.uuid, r.chat_id, r.user_id), (None, None, None));
    }
}
