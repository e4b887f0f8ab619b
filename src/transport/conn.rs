//! The connection layer: one task reads messages off a stream, one task writes
//! them, both connected to the session's owner by bounded channels.
//!
//! `wire::read_message` is not cancel-safe (a half-read message would be lost
//! if its future were dropped in a `select!`), so reading lives in its own task
//! and the owner selects on a channel instead. Writing lives in its own task so
//! that an owner never blocks on a slow socket while acknowledgements wait to be
//! read: the owner reserves a slot in the writer's queue inside its `select!`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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

/// When a stream last moved bytes: shared between a [`ProgressWriter`] or a
/// [`ProgressReader`] and whoever judges whether the peer is still there (a
/// slow link keeps moving bytes long before a whole frame or its answer is
/// through; a hung or vanished peer stops, on a write once the socket buffers
/// are full, on a read at once).
#[derive(Debug, Clone)]
pub struct Progress {
    base: Instant,
    ms: Arc<AtomicU64>,
}

impl Progress {
    /// Progress counted from now.
    pub fn new() -> Self {
        Progress {
            base: Instant::now(),
            ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The last time bytes moved (or was noted, or the creation time).
    pub fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.ms.load(Ordering::Relaxed))
    }

    /// Count now as progress (e.g. when a reader starts waiting for a peer
    /// that had nothing to say until then).
    pub fn note(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Wrap `w` so that every write or flush that makes progress is noted.
    pub fn wrap<W>(&self, w: W) -> ProgressWriter<W> {
        ProgressWriter {
            inner: w,
            progress: self.clone(),
        }
    }

    /// Wrap `r` so that every read that returns bytes is noted.
    pub fn wrap_reader<R>(&self, r: R) -> ProgressReader<R> {
        ProgressReader {
            inner: r,
            progress: self.clone(),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// An `AsyncRead` that notes in a [`Progress`] when bytes arrive.
#[derive(Debug)]
pub struct ProgressReader<R> {
    inner: R,
    progress: Progress,
}

impl<R: AsyncRead + Unpin> AsyncRead for ProgressReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.progress.note();
        }
        r
    }
}

/// An `AsyncWrite` that notes in a [`Progress`] when bytes get through.
#[derive(Debug)]
pub struct ProgressWriter<W> {
    inner: W,
    progress: Progress,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ProgressWriter<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.progress.note();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.progress.note();
        }
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
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

    #[tokio::test]
    async fn write_progress_moves_while_bytes_get_through_and_stops_when_they_do_not() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(1024);
        let progress = Progress::new();
        let t0 = progress.last();
        let mut w = progress.wrap(a);
        tokio::time::sleep(Duration::from_millis(30)).await;
        w.write_all(&[1; 512]).await.unwrap();
        let t1 = progress.last();
        assert!(t1 > t0, "a write that got through is noted");
        // The peer reads nothing: the pipe fills and the writer stops.
        let blocked =
            tokio::time::timeout(Duration::from_millis(100), w.write_all(&[2; 4096])).await;
        assert!(blocked.is_err(), "the pipe is full");
        let t2 = progress.last();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(progress.last(), t2, "no progress noted while blocked");
        // The peer reads: bytes get through again.
        let mut buf = vec![0; 1024];
        b.read_exact(&mut buf).await.unwrap();
        w.write_all(&[3; 100]).await.unwrap();
        assert!(progress.last() > t2);
    }

    #[tokio::test]
    async fn read_progress_moves_when_bytes_arrive_and_stops_when_none_do() {
        use tokio::io::AsyncReadExt;
        let (mut a, b) = tokio::io::duplex(1024);
        let progress = Progress::new();
        let t0 = progress.last();
        let mut r = progress.wrap_reader(b);
        tokio::time::sleep(Duration::from_millis(30)).await;
        a.write_all(&[1; 100]).await.unwrap();
        let mut buf = [0u8; 100];
        r.read_exact(&mut buf).await.unwrap();
        let t1 = progress.last();
        assert!(t1 > t0, "bytes that arrived are noted");
        // Nothing arrives: a read waits and notes nothing.
        let waited = tokio::time::timeout(Duration::from_millis(60), r.read(&mut buf)).await;
        assert!(waited.is_err(), "nothing to read");
        assert_eq!(progress.last(), t1, "no progress noted while waiting");
        // The end of the stream is not progress either.
        drop(a);
        assert_eq!(r.read(&mut buf).await.unwrap(), 0);
        assert_eq!(progress.last(), t1);
    }
}
