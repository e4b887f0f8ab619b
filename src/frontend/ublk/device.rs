//! One ublk device: its life from ADD_DEV to DEL_DEV, and its queue threads.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ctrl::Control;
use super::proto::{DEV_ID_ANY, DevInfo, F_CMD_IOCTL_ENCODE, Limits, Params, S_DEV_LIVE};
use super::queue::{self, QueueIo};
use super::sys::{QueueRing, page_size};
use super::{DEV_UBLK_CONTROL, UblkError, UblkOptions, UblkStats};
use crate::frontend::BlockIo;

/// How long the queue threads may take to set up and fetch every tag.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the queue threads may take to end after STOP_DEV.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `/dev/ublkcN` may take to appear after ADD_DEV (devtmpfs, udev).
const CDEV_TIMEOUT: Duration = Duration::from_secs(5);

/// A started ublk device serving one disk as `/dev/ublkbN`. Dropping it stops
/// and deletes the device (as [`UblkDevice::stop`], logging failures).
pub struct UblkDevice {
    dev_id: u32,
    ctrl: Control,
    /// `/dev/ublkcN`, shared with the queue threads; closed before DEL_DEV.
    cdev: Option<Arc<File>>,
    queues: Vec<(u16, JoinHandle<()>)>,
    exits: Option<mpsc::Receiver<u16>>,
    stats: Arc<UblkStats>,
    size: u64,
    stopped: bool,
}

impl std::fmt::Debug for UblkDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UblkDevice")
            .field("dev_id", &self.dev_id)
            .field("queues", &self.queues.len())
            .field("size", &self.size)
            .finish()
    }
}

/// Tells the device a queue thread ended, however it ended.
struct ExitGuard(u16, mpsc::Sender<u16>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = self.1.send(self.0);
    }
}

impl UblkDevice {
    /// Create, set up and start a device serving `disk` through
    /// `/dev/ublk-control`. Blocks until `/dev/ublkbN` exists. On failure
    /// nothing is left behind (the device, if created, is deleted).
    pub fn start(disk: Arc<dyn BlockIo>, opts: &UblkOptions) -> Result<UblkDevice, UblkError> {
        Self::start_at(Path::new(DEV_UBLK_CONTROL), disk, opts)
    }

    /// [`UblkDevice::start`] with the control device at `control`.
    pub(crate) fn start_at(
        control: &Path,
        disk: Arc<dyn BlockIo>,
        opts: &UblkOptions,
    ) -> Result<UblkDevice, UblkError> {
        opts.validate()?;
        let mut ctrl = Control::open(control)?;
        let want = DevInfo {
            nr_hw_queues: opts.queues,
            queue_depth: opts.depth,
            max_io_buf_bytes: opts.max_request_bytes,
            dev_id: opts.dev_id.unwrap_or(DEV_ID_ANY),
            flags: F_CMD_IOCTL_ENCODE,
            ..DevInfo::default()
        };
        let info = ctrl.add_dev(&want)?;
        let mut dev = UblkDevice {
            dev_id: info.dev_id,
            ctrl,
            cdev: None,
            queues: Vec::new(),
            exits: None,
            stats: Arc::new(UblkStats::default()),
            size: 0,
            stopped: false,
        };
        match dev.bring_up(&info, disk, opts) {
            Ok(()) => Ok(dev),
            Err(e) => {
                if let Err(e2) = dev.shutdown() {
                    tracing::error!(dev = dev.dev_id, "ublk cleanup after a failed start: {e2}");
                }
                Err(e)
            }
        }
    }

    /// Everything after ADD_DEV: parameters, queues, START_DEV.
    fn bring_up(
        &mut self,
        info: &DevInfo,
        disk: Arc<dyn BlockIo>,
        opts: &UblkOptions,
    ) -> Result<(), UblkError> {
        let dev = self.dev_id;
        let page = page_size();
        let buf_len = info.max_io_buf_bytes as usize;
        if info.nr_hw_queues == 0
            || info.queue_depth == 0
            || buf_len < opts.logical_block as usize
            || !buf_len.is_multiple_of(page)
        {
            return Err(UblkError::Disk {
                dev,
                reason: format!("the driver granted an unusable device: {info:?}"),
            });
        }
        let params = Params::for_disk(
            disk.size(),
            opts.logical_block,
            info.max_io_buf_bytes,
            disk.read_only(),
        );
        if params.basic.dev_sectors == 0 {
            return Err(UblkError::Disk {
                dev,
                reason: format!(
                    "the disk ({} bytes) is smaller than one {}-byte block",
                    disk.size(),
                    opts.logical_block
                ),
            });
        }
        let lim = Limits::of(&params, info.max_io_buf_bytes);
        self.size = lim.size;
        if lim.size != disk.size() {
            tracing::warn!(
                dev,
                size = disk.size(),
                exposed = lim.size,
                "the disk's size is not a multiple of the logical block: its tail is not reachable through ublk"
            );
        }
        self.ctrl.set_params(dev, &params)?;
        let cdev = Arc::new(open_cdev(dev)?);
        self.cdev = Some(cdev.clone());

        let (ready_tx, ready_rx) = mpsc::channel::<(u16, Result<(), String>)>();
        let (exit_tx, exit_rx) = mpsc::channel::<u16>();
        self.exits = Some(exit_rx);
        for q in 0..info.nr_hw_queues {
            let ctx = QueueCtx {
                dev,
                q,
                depth: info.queue_depth,
                buf_len,
                cdev: cdev.clone(),
                disk: disk.clone(),
                lim,
                stats: self.stats.clone(),
            };
            let ready = ready_tx.clone();
            let guard = ExitGuard(q, exit_tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("ublk{dev}q{q}"))
                .spawn(move || {
                    let _guard = guard;
                    ctx.run(ready);
                })
                .map_err(|e| UblkError::Queue {
                    dev,
                    queue: q,
                    reason: format!("cannot start its thread: {e}"),
                })?;
            self.queues.push((q, h));
        }
        drop((ready_tx, exit_tx));
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut waiting: Vec<u16> = (0..info.nr_hw_queues).collect();
        while let Some(&queue) = waiting.first() {
            let left = deadline.saturating_duration_since(Instant::now());
            match ready_rx.recv_timeout(left) {
                Ok((q, Ok(()))) => waiting.retain(|&x| x != q),
                Ok((queue, Err(reason))) => return Err(UblkError::Queue { dev, queue, reason }),
                Err(_) => {
                    return Err(UblkError::Queue {
                        dev,
                        queue,
                        reason: format!("did not fetch its tags within {READY_TIMEOUT:?}"),
                    });
                }
            }
        }

        self.ctrl.start_dev(dev, std::process::id() as i32)?;
        let now = self.ctrl.dev_info(dev)?;
        if now.state != S_DEV_LIVE {
            return Err(UblkError::Disk {
                dev,
                reason: format!(
                    "START_DEV succeeded but the device is in state {}",
                    now.state
                ),
            });
        }
        tracing::info!(
            dev,
            queues = info.nr_hw_queues,
            depth = info.queue_depth,
            max_io = info.max_io_buf_bytes,
            size = lim.size,
            "ublk device started"
        );
        Ok(())
    }

    /// Device number N.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// The block device, `/dev/ublkbN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    /// Bytes the block device exposes (the disk's size, down to a whole
    /// logical block).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The device's counters.
    pub fn stats(&self) -> Arc<UblkStats> {
        self.stats.clone()
    }

    /// Stop and delete the device: STOP_DEV removes `/dev/ublkbN` once the
    /// requests in flight are answered and aborts every fetch, which ends the
    /// queue threads; then `/dev/ublkcN` is closed and DEL_DEV removes it.
    /// Blocks. If a queue thread does not end within 30 s, it is left running
    /// with its buffers (the kernel may still use them) and the device is not
    /// deleted; the kernel removes it when the process exits.
    pub fn stop(mut self) -> Result<(), UblkError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), UblkError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let dev = self.dev_id;
        let mut first = None;
        if self.exits.is_some()
            && let Err(e) = self.ctrl.stop_dev(dev)
        {
            first.get_or_insert(e);
        }
        if let Some(queue) = self.join_queues(STOP_TIMEOUT) {
            let e = UblkError::Queue {
                dev,
                queue,
                reason: format!(
                    "did not end within {STOP_TIMEOUT:?} of STOP_DEV; the device is left to the kernel"
                ),
            };
            return Err(first.unwrap_or(e));
        }
        self.cdev = None;
        if let Err(e) = self.ctrl.del_dev(dev) {
            first.get_or_insert(e);
        }
        match first {
            None => {
                tracing::info!(dev, "ublk device stopped and deleted");
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// Wait up to `timeout` for every queue thread to end and join them;
    /// returns a queue that did not end.
    fn join_queues(&mut self, timeout: Duration) -> Option<u16> {
        let exits = self.exits.as_ref()?;
        let deadline = Instant::now() + timeout;
        while let Some(&(first, _)) = self.queues.first() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(q) = exits.recv_timeout(left) else {
                return Some(first);
            };
            if let Some(i) = self.queues.iter().position(|(x, _)| *x == q) {
                let (_, h) = self.queues.swap_remove(i);
                if h.join().is_err() {
                    tracing::error!(dev = self.dev_id, queue = q, "ublk queue thread panicked");
                }
            }
        }
        None
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(dev = self.dev_id, "stopping ublk device: {e}");
        }
    }
}

/// Open `/dev/ublkcN`, waiting a little for the node to appear.
fn open_cdev(dev: u32) -> Result<File, UblkError> {
    let path = format!("/dev/ublkc{dev}");
    let deadline = Instant::now() + CDEV_TIMEOUT;
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                return Err(UblkError::Queue {
                    dev,
                    queue: 0,
                    reason: format!("opening {path}: {e}"),
                });
            }
        }
    }
}

/// What a queue thread needs.
struct QueueCtx {
    dev: u32,
    q: u16,
    depth: u16,
    buf_len: usize,
    cdev: Arc<File>,
    disk: Arc<dyn BlockIo>,
    lim: Limits,
    stats: Arc<UblkStats>,
}

impl QueueCtx {
    /// The queue thread: set up, fetch every tag, report, serve until aborted.
    fn run(self, ready: mpsc::Sender<(u16, Result<(), String>)>) {
        let QueueCtx {
            dev,
            q,
            depth,
            buf_len,
            cdev,
            disk,
            lim,
            stats,
        } = self;
        let mut ring = match QueueRing::new(cdev, q, depth, buf_len) {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send((q, Err(format!("setting up its ring and mappings: {e}"))));
                return;
            }
        };
        if let Err(e) = ring.fetch_all() {
            let _ = ready.send((q, Err(format!("fetching its {depth} tags: {e}"))));
            return;
        }
        let _ = ready.send((q, Ok(())));
        drop(ready);
        debug_assert_eq!(ring.depth(), depth);
        stats.serving(true);
        let r = queue::run(&mut ring, q, &*disk, &lim, &stats);
        stats.serving(false);
        match r {
            Ok(()) => tracing::debug!(dev, queue = q, "ublk queue ended"),
            Err(e) => tracing::error!(
                dev,
                "ublk {e}; the queue stops serving and the kernel fails the device's I/O"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::backing::BackingDisk;
    use crate::error::{Classify, ErrorKind};

    #[test]
    fn starting_without_a_control_device_is_a_one_line_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let disk: Arc<dyn BlockIo> = Arc::new(BackingDisk::open(&p).unwrap());
        let missing = dir.path().join("ublk-control");
        let e = UblkDevice::start_at(&missing, disk.clone(), &UblkOptions::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "ublk: {} not found: needs Linux ≥ 6.0 with the ublk_drv module loaded",
                missing.display()
            )
        );
        assert_eq!(e.kind(), ErrorKind::Config);
        // Options are checked before anything else.
        let bad = UblkOptions {
            depth: 0,
            ..UblkOptions::default()
        };
        let e = UblkDevice::start_at(&missing, disk, &bad).unwrap_err();
        assert!(matches!(e, UblkError::InvalidOptions(_)), "{e}");
    }

    /// On these machines `/dev/ublk-control` does not exist, and the real
    /// entry point says so; where it exists, a device starts and stops.
    #[test]
    fn start_on_this_machine() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        File::create(&p).unwrap().set_len(16 << 20).unwrap();
        let disk: Arc<dyn BlockIo> = Arc::new(BackingDisk::open(&p).unwrap());
        match UblkDevice::start(disk, &UblkOptions::default()) {
            Ok(d) => {
                assert!(Path::new(DEV_UBLK_CONTROL).exists());
                assert!(d.path().exists(), "{}", d.path().display());
                assert_eq!(d.size(), 16 << 20);
                d.stop().unwrap();
            }
            Err(e) => {
                assert!(!Path::new(DEV_UBLK_CONTROL).exists(), "{e}");
                assert!(matches!(e, UblkError::ControlMissing { .. }), "{e}");
            }
        }
    }
}
