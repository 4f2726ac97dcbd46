//! Reply validation: any request fields give a verdict, never a panic; what passes is JSON.
#![no_main]

use feishu_reply_gateway::reply::RawReply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    |f: (String, String, String, bool, String, String, String)| {
        let (message_id, msg_type, content, reply_in_thread, uuid, chat_id, user_id) = f;
        let raw = RawReply {
            message_id: &message_id,
            msg_type: &msg_type,
            content: &content,
            reply_in_thread,
            uuid: &uuid,
            chat_id: &chat_id,
            user_id: &user_id,
        };
        match raw.validate() {
            Ok(r) => {
                assert!(serde_json::from_str::<serde_json::Value>(&r.content).is_ok());
                assert!(r.uuid.as_ref().is_none_or(|u| u.chars().count() <= 50));
            }
            Err(e) => {
                // The message is bounded whatever the input's size.
                assert!(e.to_string().len() < 4096, "{e}");
            }
        }
    }
);
