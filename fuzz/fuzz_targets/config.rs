//! The config file: any text gives a configuration or an error, never a panic; an error never
//! quotes an app secret the text holds.
#![no_main]

use feishu_reply_gateway::config::Config;
use libfuzzer_sys::fuzz_target;

fn secrets(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                if let (true, toml::Value::String(s)) = (k == "app_secret", v) {
                    out.push(s.clone());
                }
                secrets(v, out);
            }
        }
        toml::Value::Array(a) => a.iter().for_each(|v| secrets(v, out)),
        _ => {}
    }
}

fuzz_target!(|text: &str| {
    let Err(e) = Config::from_toml(text) else {
        return;
    };
    let shown = e.to_string();
    let mut found = Vec::new();
    if let Ok(v) = text.parse::<toml::Table>() {
        secrets(&toml::Value::Table(v), &mut found);
    }
    for s in found.iter().filter(|s| s.len() >= 8) {
        assert!(!shown.contains(s.as_str()), "{shown}");
    }
});
