//! A shutdown signal every long-running loop selects on (mini-redis style):
//! one [`Trigger`] fires it, any number of cloned [`Shutdown`] handles observe it.

use tokio::sync::watch;

/// Fires the shutdown signal.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Observes the shutdown signal; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A new, not yet fired, signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    /// Tell every observer to stop. Idempotent.
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    /// Another observer of this signal.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// True once the signal fired.
    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes when the signal fires (at once if it already has, or if the
    /// trigger was dropped: an orphaned loop must not run forever).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|v| *v).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_all_observers_and_dropped_trigger_counts_as_fired() {
        let (t, s) = channel();
        let mut a = s.clone();
        assert!(!s.is_fired());
        t.fire();
        a.wait().await;
        assert!(s.is_fired());
        let (t, mut s) = channel();
        drop(t);
        s.wait().await;
    }
}
