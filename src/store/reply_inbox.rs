//! The writer's answers handed over per caller thread: a group's answers for callers on one
//! HTTP worker go over in one hand-over (one wake-up of that worker), and a task on that
//! worker answers each caller there, so waking each caller is no cross-thread wake-up.
//!
//! Waking a task of another thread's runtime is a system call (an `eventfd` write) and,
//! when that thread sleeps, an inter-processor interrupt: once per webhook from the writer,
//! about 1 µs of its time each under wrk (on its critical path), where one per worker and
//! group does. A caller on a thread without an inbox is answered by the writer directly,
//! as is every caller of an inbox whose task has ended (its runtime stopped).

use std::cell::RefCell;

use tokio::sync::mpsc;

/// One caller's answer, ready to be given.
pub type Reply = Box<dyn FnOnce() + Send>;

/// The hand-over point of one thread's callers; served by a task of that thread's runtime.
#[derive(Clone)]
pub struct ReplyInbox(mpsc::UnboundedSender<Vec<Reply>>);

impl ReplyInbox {
    fn is(&self, other: &ReplyInbox) -> bool {
        self.0.same_channel(&other.0)
    }
}

thread_local! {
    static THIS_THREAD: RefCell<Option<ReplyInbox>> = const { RefCell::new(None) };
}

/// Gives this thread an inbox served by a task of its runtime (once; later calls keep the
/// first). For the threads of single-threaded runtimes, where that task runs beside the
/// callers: the HTTP workers. Without a runtime here it does nothing.
pub fn serve_this_thread() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    THIS_THREAD.with(|inbox| {
        let mut inbox = inbox.borrow_mut();
        if inbox.is_some() {
            return;
        }
        let (sender, mut receiver) = mpsc::unbounded_channel::<Vec<Reply>>();
        runtime.spawn(async move {
            while let Some(replies) = receiver.recv().await {
                for reply in replies {
                    reply();
                }
            }
        });
        *inbox = Some(ReplyInbox(sender));
    });
}

/// This thread's inbox, if it has one.
pub fn this_thread() -> Option<ReplyInbox> {
    THIS_THREAD.with(|inbox| inbox.borrow().clone())
}

/// A group's answers, gathered per inbox, then handed over.
#[derive(Default)]
pub struct ReplyBatch {
    by_inbox: Vec<(ReplyInbox, Vec<Reply>)>,
}

impl ReplyBatch {
    /// Keeps `reply` for `inbox`, or gives it now when there is none.
    pub fn push(&mut self, inbox: Option<&ReplyInbox>, reply: Reply) {
        let Some(inbox) = inbox else {
            reply();
            return;
        };
        match self.by_inbox.iter_mut().find(|(kept, _)| kept.is(inbox)) {
            Some((_, replies)) => replies.push(reply),
            None => self.by_inbox.push((inbox.clone(), vec![reply])),
        }
    }

    /// Hands each inbox its answers; gives here those whose inbox is no longer served.
    pub fn deliver(self) {
        for (inbox, replies) in self.by_inbox {
            if let Err(mpsc::error::SendError(replies)) = inbox.0.send(replies) {
                for reply in replies {
                    reply();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    fn counting(count: &Arc<AtomicUsize>) -> Reply {
        let count = count.clone();
        Box::new(move || {
            count.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn without_an_inbox_a_reply_is_given_at_once() {
        let count = Arc::new(AtomicUsize::new(0));
        let mut batch = ReplyBatch::default();
        batch.push(None, counting(&count));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        batch.deliver();
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_inbox_gets_its_replies_in_one_hand_over_and_answers_them_on_its_thread() {
        serve_this_thread();
        let inbox = this_thread().expect("an inbox on a runtime thread");
        let here = std::thread::current().id();
        let (sender, mut answered) = mpsc::unbounded_channel();
        let mut batch = ReplyBatch::default();
        for n in 0..3 {
            let sender = sender.clone();
            batch.push(
                Some(&inbox),
                Box::new(move || {
                    let _ = sender.send((n, std::thread::current().id()));
                }),
            );
        }
        assert_eq!(batch.by_inbox.len(), 1, "one inbox, one hand-over");
        // Handed over from another thread, as the writer does.
        std::thread::spawn(move || batch.deliver())
            .join()
            .expect("deliver");
        for n in 0..3 {
            let (got, thread) = answered.recv().await.expect("answered");
            assert_eq!(got, n, "in order");
            assert_eq!(thread, here, "answered on the inbox's thread");
        }
    }

    #[test]
    fn an_inbox_no_longer_served_has_its_replies_given_by_the_deliverer() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let inbox = runtime.block_on(async {
            serve_this_thread();
            this_thread().expect("inbox")
        });
        drop(runtime);
        let count = Arc::new(AtomicUsize::new(0));
        let mut batch = ReplyBatch::default();
        batch.push(Some(&inbox), counting(&count));
        batch.push(Some(&inbox), counting(&count));
        batch.deliver();
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }
}
