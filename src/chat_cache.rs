//! message_id → chat_id, for requests that name no chat: looked up once from Feishu, then
//! remembered in a bounded two-generation cache (at most `capacity` entries, O(1), no sweeps).

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// Bounded cache: new entries go to `hot`; when `hot` holds capacity/2, it becomes `cold`
/// and the old `cold` is dropped. A hit in `cold` is promoted.
pub struct ChatCache {
    half: usize,
    gens: Mutex<Generations>,
}

#[derive(Default)]
struct Generations {
    hot: HashMap<Arc<str>, Arc<str>>,
    cold: HashMap<Arc<str>, Arc<str>>,
}

impl ChatCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            half: (capacity / 2).max(1),
            gens: Mutex::new(Generations::default()),
        }
    }

    pub fn get(&self, message_id: &str) -> Option<Arc<str>> {
        let mut g = self.gens.lock();
        if let Some(chat) = g.hot.get(message_id) {
            return Some(chat.clone());
        }
        let (key, chat) = g.cold.remove_entry(message_id)?;
        Self::insert_locked(&mut g, self.half, key, chat.clone());
        Some(chat)
    }

    pub fn insert(&self, message_id: &str, chat_id: Arc<str>) {
        let mut g = self.gens.lock();
        Self::insert_locked(&mut g, self.half, message_id.into(), chat_id);
    }

    fn insert_locked(g: &mut Generations, half: usize, key: Arc<str>, chat: Arc<str>) {
        if g.hot.len() >= half && !g.hot.contains_key(&key) {
            g.cold = std::mem::take(&mut g.hot);
        }
        g.hot.insert(key, chat);
    }

    pub fn len(&self) -> usize {
        let g = self.gens.lock();
        g.hot.len() + g.cold.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_bounded_and_keeps_recent_entries() {
        let c = ChatCache::new(100);
        for i in 0..1000 {
            c.insert(&format!("om_{i}"), format!("oc_{i}").into());
            assert!(c.len() <= 100);
        }
        assert_eq!(c.get("om_999").as_deref(), Some("oc_999"));
        assert_eq!(c.get("om_0"), None);
        // A cold hit survives the next rotation.
        assert_eq!(c.get("om_951").as_deref(), Some("oc_951"));
        for i in 1000..1049 {
            c.insert(&format!("om_{i}"), "x".into());
        }
        assert_eq!(c.get("om_951").as_deref(), Some("oc_951"));
    }
}
