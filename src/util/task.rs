//! Spawned tasks tied to the scope that owns them.

/// Aborts a spawned task when dropped: a task that serves one connection or
/// session (its writer, its signs of life) must not outlive it, even when the
/// owner returns early or is cut short at a deadline.
#[derive(Debug)]
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_it_aborts_the_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let guard = AbortOnDrop(tokio::spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await;
        }));
        drop(guard);
        // The task's sender is dropped with the aborted task.
        assert!(rx.await.is_err());
    }
}
