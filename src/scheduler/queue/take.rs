//! Jobs that leave their queue unsent: their caller went away, a cancel named them, or a
//! newer update of the same message or card supersedes them.

use std::collections::VecDeque;

use super::{Job, Queues};

impl Queues {
    /// Takes out `chat`'s queued jobs whose caller went away (their result channel is closed),
    /// at once rather than when they reach the head: they hold queue room and memory. A job
    /// in flight is not queued and finishes on its own; a head being decided outside gives
    /// its grant back when the answer comes (the head changed).
    pub fn take_abandoned(&mut self, chat_id: &str) -> Vec<Job> {
        let Some(chat) = self.chats.get_mut(chat_id) else {
            return Vec::new();
        };
        let (gone, kept): (VecDeque<Job>, VecDeque<Job>) =
            chat.jobs.drain(..).partition(|j| j.done.is_closed());
        chat.jobs = kept;
        for job in &gone {
            self.counts.remove(job);
        }
        if chat.jobs.is_empty() && !chat.busy {
            self.chats.remove(chat_id);
        }
        gone.into()
    }

    /// Takes the queued job with `uuid` out of `chat_id` (not one in flight).
    pub fn take_queued(&mut self, chat_id: &str, uuid: &str) -> Option<Job> {
        let chat = self.chats.get_mut(chat_id)?;
        let pos = chat.jobs.iter().position(|j| j.uuid_str() == uuid)?;
        let job = chat.jobs.remove(pos).expect("position is valid");
        self.counts.remove(&job);
        if chat.jobs.is_empty() && !chat.busy {
            self.chats.remove(chat_id);
        }
        Some(job)
    }

    /// Takes out the updates (of a message, or a card's texts) waiting at the tail of
    /// `chat_id`'s queue (none in flight or being decided): a newer one supersedes them
    /// ([`crate::feishu::Call::latest_wins`]). Any other job (a recall, a card's settings)
    /// stops the walk, so nothing is reordered around it.
    pub fn take_superseded(&mut self, chat_id: &str) -> Vec<Job> {
        let Some(chat) = self.chats.get_mut(chat_id) else {
            return Vec::new();
        };
        let first_free = usize::from(chat.busy);
        let mut out = Vec::new();
        while chat.jobs.len() > first_free
            && chat
                .jobs
                .back()
                .is_some_and(|j| j.spec.request.latest_wins())
        {
            out.push(chat.jobs.pop_back().expect("non-empty"));
        }
        for job in &out {
            self.counts.remove(job);
        }
        if chat.jobs.is_empty() && !chat.busy {
            self.chats.remove(chat_id);
        }
        out
    }
}
