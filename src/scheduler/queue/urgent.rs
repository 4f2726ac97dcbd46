//! Which chats are on the critical path of their app's drain (urgent) and go first: the
//! dispatcher sets the depth from the app's backlog (`Dispatcher::mark_urgent_chats`); here a
//! chat is ordered by it when it becomes runnable.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use super::Queues;
use crate::scheduler::Lane;

impl Queues {
    /// Puts `chat` in the runnable heap: urgent chats first, then by ticket (oldest first).
    pub(super) fn make_runnable(&mut self, chat_id: Arc<str>, ticket: u64) {
        let urgent = self.is_urgent(&chat_id);
        if urgent && let Some(head) = self.chats.get(&chat_id).and_then(|c| c.jobs.front()) {
            self.urgent_seen
                .entry(head.spec.app_id.clone())
                .or_default()
                .insert(chat_id.clone());
        }
        self.runnable.push(Reverse((!urgent, ticket, chat_id)));
    }

    /// The urgent chats of `app_id` now, with the jobs each holds (those no longer urgent are
    /// forgotten).
    pub fn urgent_chats(&mut self, app_id: &str) -> Vec<(Arc<str>, usize)> {
        let Some(seen) = self.urgent_seen.get_mut(app_id) else {
            return Vec::new();
        };
        let (chats, depth) = (&self.chats, &self.urgent_depth);
        seen.retain(|c| {
            chats.get(c).is_some_and(|q| {
                q.jobs.front().is_some_and(|h| {
                    depth
                        .get(&h.spec.app_id)
                        .is_some_and(|&d| q.jobs.len() >= d)
                })
            })
        });
        let out = seen
            .iter()
            .map(|c| (c.clone(), chats[c].jobs.len()))
            .collect();
        if seen.is_empty() {
            self.urgent_seen.remove(app_id);
        }
        out
    }

    /// Chats of app `app_id` holding at least `depth` jobs are urgent from now on: they are
    /// tried before the others whenever several may go (`usize::MAX`: none is). The
    /// dispatcher sets it from the app's backlog: when the app's windows are the bottleneck,
    /// a chat whose own quota needs as long for its backlog as the app needs for everything
    /// is the critical path of the drain, and goes first, up to its own quota.
    pub fn set_urgent(&mut self, app_id: &Arc<str>, depth: usize) {
        if depth == usize::MAX {
            self.urgent_depth.remove(app_id);
        } else {
            self.urgent_depth.insert(app_id.clone(), depth);
        }
    }

    /// Whether `chat`'s head goes first: it is a stream's end ([`Lane::Final`]), or the
    /// chat's backlog makes it urgent (see [`Self::set_urgent`]).
    pub fn is_urgent(&self, chat_id: &str) -> bool {
        let Some(chat) = self.chats.get(chat_id) else {
            return false;
        };
        chat.jobs.front().is_some_and(|head| {
            head.spec.lane == Lane::Final
                || self
                    .urgent_depth
                    .get(&head.spec.app_id)
                    .is_some_and(|&d| chat.jobs.len() >= d)
        })
    }

    /// Jobs queued per app_id (an app_id several app names share counts once, all of them).
    pub fn queued_by_app_id(&self) -> HashMap<Arc<str>, usize> {
        let mut by = HashMap::new();
        for (i, (queued, _)) in self.counts.per_app.iter().enumerate() {
            if *queued > 0
                && let Some(id) = self.counts.app_ids.get(i).cloned().flatten()
            {
                *by.entry(id).or_default() += queued;
            }
        }
        by
    }
}
