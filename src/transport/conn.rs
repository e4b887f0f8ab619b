//! The connection layer: one task reads messages off a stream, one task writes
//! them, both connected to the session's owner by bounded channels.
//!
//! `wire::read_message` is not cancel-safe (a half-read message would be lost
//! if its future were dropped in a `select!`), so reading lives in its own task
//! and the owner selects on a channel instead. Writing lives in its own task so
//! that an owner never blocks on a slow socket while acknowledgements wait to be
//! read: the owner reserves a slot in the writer's queue inside its `select!`.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::wire::{self, Message, WireError};

/// Something to put on the wire.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A protocol message.
    Msg(Message),
    /// A sealed frame, shared with whoever keeps it for a resend.
    Frame(Arc<Vec<u8>>),
}

/// Start a task that writes everything sent on the returned channel, flushing
/// whenever the queue runs dry. The task ends when every sender is dropped (after
/// writing what was queued and shutting the stream down) or on the first error.
pub fn spawn_writer<W>(
    mut w: W,
    depth: usize,
) -> (mpsc::Sender<Outgoing>, JoinHandle<Result<(), WireError>>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Outgoing>(depth.max(1));
    let handle = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            while let Some(item) = next.take() {
                match &item {
                    Outgoing::Msg(m) => wire::write_unflushed(&mut w, m).await?,
                    Outgoing::Frame(b) => wire::write_frame_unflushed(&mut w, b).await?,
                }
                next = rx.try_recv().ok();
            }
            w.flush().await?;
        }
        let _ = w.shutdown().await;
        Ok(())
    });
    (tx, handle)
}

/// Start a task that reads messages and forwards them on the returned channel.
/// The last item is the error that ended the stream (`WireError::Closed` for a
/// clean end); the task also ends when the receiver is dropped.
pub fn spawn_reader<R>(
    mut r: R,
    depth: usize,
) -> (mpsc::Receiver<Result<Message, WireError>>, JoinHandle<()>)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(depth.max(1));
    let handle = tokio::spawn(async move {
        loop {
            let m = wire::read_message(&mut r).await;
            let end = m.is_err();
            if tx.send(m).await.is_err() || end {
                break;
            }
        }
    });
    (rx, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writer_and_reader_carry_messages_in_order() {
        let (a, b) = tokio::io::duplex(1 << 12);
        let (tx, wh) = spawn_writer(a, 4);
        let (mut rx, _rh) = spawn_reader(b, 4);
        for i in 0..50u64 {
            tx.send(Outgoing::Msg(Message::Ack {
                frame_no: i,
                last_seq: i,
            }))
            .await
            .unwrap();
        }
        tx.send(Outgoing::Frame(Arc::new(vec![9; 10_000])))
            .await
            .unwrap();
        drop(tx);
        for i in 0..50u64 {
            assert_eq!(
                rx.recv().await.unwrap().unwrap(),
                Message::Ack {
                    frame_no: i,
                    last_seq: i
                }
            );
        }
        assert_eq!(
            rx.recv().await.unwrap().unwrap(),
            Message::Frame(vec![9; 10_000])
        );
        assert!(matches!(rx.recv().await.unwrap(), Err(WireError::Closed)));
        wh.await.unwrap().unwrap();
    }
}
