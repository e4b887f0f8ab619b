//! The ublk frontend: a protected disk as a Linux block device, `/dev/ublkbN`,
//! served from user space through `ublk_drv` (Linux ≥ 6.0; the ioctl-encoded
//! commands used here, ≥ 6.4).
//!
//! [`UblkDevice::start`] (cargo feature `ublk`) asks `/dev/ublk-control` for a
//! device (ADD_DEV), gives it the disk's size and limits (SET_PARAMS), starts
//! one thread per hardware queue, each with its own io_uring on `/dev/ublkcN`
//! fetching every tag of its queue, then starts the device (START_DEV). Each
//! request is mapped onto the disk's [`BlockIo`]: reads to `read_at`, writes
//! to `write_at` (with FUA), flushes to `flush`, discards to `trim`,
//! write-zeroes to `write_zeroes`; a failure's [`crate::frontend::IoError::errno`]
//! is the request's negative result. [`UblkDevice::stop`] stops the device
//! (the kernel answers nothing more; the queues end) and deletes it.
//!
//! The pure parts — the ABI ([`proto`]), one request ([`handle`]), the queue
//! loop over an abstract ring ([`queue`]), the counters and the options — are
//! compiled and tested without the feature; only the device-facing parts
//! (`sys`: the rings, the mappings, the buffers; `ctrl`: the control commands;
//! the device itself) need it. Everything here is described, with what has
//! and has not been tested, in `docs/UBLK.md`.

#[cfg_attr(not(feature = "ublk"), allow(dead_code))]
pub(crate) mod handle;
#[cfg_attr(not(feature = "ublk"), allow(dead_code))]
pub(crate) mod proto;
#[cfg_attr(not(feature = "ublk"), allow(dead_code))]
pub(crate) mod queue;
#[cfg_attr(not(feature = "ublk"), allow(dead_code))]
mod stats;

#[cfg(feature = "ublk")]
mod ctrl;
#[cfg(feature = "ublk")]
mod device;
#[cfg(feature = "ublk")]
mod sys;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::error::{Classify, ErrorKind};

#[cfg(feature = "ublk")]
pub use device::UblkDevice;
pub use stats::{UblkStats, UblkStatsSnapshot};

/// The ublk control device.
pub const DEV_UBLK_CONTROL: &str = "/dev/ublk-control";

/// How a ublk device is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UblkOptions {
    /// Device number N of `/dev/ublkbN`; `None` lets the kernel choose.
    pub dev_id: Option<u32>,
    /// Hardware queues, one serving thread each (the kernel caps it at the
    /// number of CPUs).
    pub queues: u16,
    /// Requests in flight per queue (tags), at most 4096.
    pub depth: u16,
    /// Largest read or write in bytes: a multiple of 4096, at most 32 MiB.
    /// Each tag has a buffer of this size (reserved lazily).
    pub max_request_bytes: u32,
    /// Logical block size: 512 or 4096.
    pub logical_block: u32,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions {
            dev_id: None,
            queues: 1,
            depth: 64,
            max_request_bytes: 512 * 1024,
            logical_block: 4096,
        }
    }
}

/// Largest buffer memory one queue may reserve (depth × max request).
pub const MAX_QUEUE_BUFFER_BYTES: u64 = 1 << 30;

impl UblkOptions {
    /// Check every field against the driver's limits.
    pub fn validate(&self) -> Result<(), UblkError> {
        let bad = |m: String| Err(UblkError::InvalidOptions(m));
        if let Some(id) = self.dev_id
            && id > proto::MAX_DEV_ID
        {
            return bad(format!("dev_id {id} is above {}", proto::MAX_DEV_ID));
        }
        if !(1..=proto::MAX_NR_QUEUES).contains(&self.queues) {
            return bad(format!(
                "queues {} is outside 1..={}",
                self.queues,
                proto::MAX_NR_QUEUES
            ));
        }
        if !(1..=proto::MAX_QUEUE_DEPTH).contains(&self.depth) {
            return bad(format!(
                "depth {} is outside 1..={}",
                self.depth,
                proto::MAX_QUEUE_DEPTH
            ));
        }
        if self.logical_block != 512 && self.logical_block != 4096 {
            return bad(format!(
                "logical_block {} is neither 512 nor 4096",
                self.logical_block
            ));
        }
        let m = self.max_request_bytes;
        if !(4096..=proto::MAX_IO_BUF_BYTES).contains(&m) || !m.is_multiple_of(4096) {
            return bad(format!(
                "max request {m} bytes is not a multiple of 4096 in 4096..={}",
                proto::MAX_IO_BUF_BYTES
            ));
        }
        let per_queue = u64::from(self.depth) * u64::from(m);
        if per_queue > MAX_QUEUE_BUFFER_BYTES {
            return bad(format!(
                "depth {} × max request {m} bytes = {} MiB of buffers per queue, above {} MiB",
                self.depth,
                per_queue >> 20,
                MAX_QUEUE_BUFFER_BYTES >> 20
            ));
        }
        Ok(())
    }
}

/// Why a ublk device could not start, or stop cleanly.
#[derive(Debug, Error)]
pub enum UblkError {
    /// No control device: no ublk in this kernel, or the module is not loaded.
    #[error("ublk: {} not found: needs Linux ≥ 6.0 with the ublk_drv module loaded", path.display())]
    ControlMissing {
        /// The control device's path.
        path: PathBuf,
    },
    /// The kernel refused: creating ublk devices needs `CAP_SYS_ADMIN`.
    #[error("ublk: {}: permission denied (creating ublk devices needs CAP_SYS_ADMIN)", path.display())]
    Permission {
        /// The control device's path.
        path: PathBuf,
    },
    /// The control device could not be opened for another reason.
    #[error("ublk: {}: {source}", path.display())]
    Open {
        /// The control device's path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The kernel knows ublk but not the ioctl-encoded commands.
    #[error(
        "ublk: ADD_DEV refused ({source}): this ublk_drv does not take ioctl-encoded \
         commands (Linux ≥ 6.4 does)"
    )]
    OldKernel {
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// io_uring could not be set up or used.
    #[error("ublk: io_uring: {0}")]
    Uring(#[source] io::Error),
    /// A control command failed.
    #[error("ublk {}: {cmd}: {source}", dev_label(*dev))]
    Command {
        /// Device number (`u32::MAX` before the kernel assigned one).
        dev: u32,
        /// The command.
        cmd: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// A control command did not complete in time.
    #[error("ublk {}: {cmd} did not complete within {secs} s", dev_label(*dev))]
    Timeout {
        /// Device number.
        dev: u32,
        /// The command.
        cmd: &'static str,
        /// The timeout.
        secs: u64,
    },
    /// A queue could not be set up, or did not stop.
    #[error("ublk {}: queue {queue}: {reason}", dev_label(*dev))]
    Queue {
        /// Device number.
        dev: u32,
        /// Queue.
        queue: u16,
        /// What went wrong.
        reason: String,
    },
    /// The device cannot present this disk (too small for one block...).
    #[error("ublk {}: {reason}", dev_label(*dev))]
    Disk {
        /// Device number.
        dev: u32,
        /// What is wrong.
        reason: String,
    },
    /// The options are out of range.
    #[error("ublk: invalid options: {0}")]
    InvalidOptions(String),
}

fn dev_label(dev: u32) -> String {
    if dev == proto::DEV_ID_ANY {
        "(new device)".into()
    } else {
        format!("device {dev}")
    }
}

impl Classify for UblkError {
    fn kind(&self) -> ErrorKind {
        match self {
            UblkError::ControlMissing { .. }
            | UblkError::OldKernel { .. }
            | UblkError::Disk { .. }
            | UblkError::InvalidOptions(_) => ErrorKind::Config,
            UblkError::Permission { .. } => ErrorKind::Auth,
            UblkError::Open { .. }
            | UblkError::Uring(_)
            | UblkError::Command { .. }
            | UblkError::Timeout { .. }
            | UblkError::Queue { .. } => ErrorKind::Io,
        }
    }
}

/// Open the control device at `path` read-write, naming what is missing when
/// it cannot be.
#[cfg_attr(not(feature = "ublk"), allow(dead_code))]
pub(crate) fn open_control(path: &Path) -> Result<File, UblkError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => UblkError::ControlMissing {
                path: path.to_path_buf(),
            },
            io::ErrorKind::PermissionDenied => UblkError::Permission {
                path: path.to_path_buf(),
            },
            _ => UblkError::Open {
                path: path.to_path_buf(),
                source: e,
            },
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_control_device_is_named_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let e = open_control(&dir.path().join("ublk-control")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        let e = open_control(Path::new("/nonexistent/ublk-control")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ublk: /nonexistent/ublk-control not found: needs Linux ≥ 6.0 with the ublk_drv module loaded"
        );
        // A directory is there but is no device.
        let e = open_control(dir.path()).unwrap_err();
        assert!(matches!(e, UblkError::Open { .. }), "{e}");
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn options_are_checked() {
        UblkOptions::default().validate().unwrap();
        let ok = UblkOptions {
            dev_id: Some(7),
            queues: 4,
            depth: 4096,
            max_request_bytes: 256 * 1024,
            logical_block: 512,
        };
        ok.validate().unwrap();
        for (bad, what) in [
            (
                UblkOptions {
                    dev_id: Some(1 << 20),
                    ..ok.clone()
                },
                "dev_id",
            ),
            (
                UblkOptions {
                    queues: 0,
                    ..ok.clone()
                },
                "queues",
            ),
            (
                UblkOptions {
                    depth: 4097,
                    ..ok.clone()
                },
                "depth",
            ),
            (
                UblkOptions {
                    logical_block: 1024,
                    ..ok.clone()
                },
                "logical_block",
            ),
            (
                UblkOptions {
                    max_request_bytes: 6144,
                    ..ok.clone()
                },
                "max request",
            ),
            (
                UblkOptions {
                    max_request_bytes: 64 << 20,
                    ..ok.clone()
                },
                "max request",
            ),
            (
                UblkOptions {
                    max_request_bytes: 1 << 20,
                    ..ok.clone()
                },
                "per queue",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            assert!(e.to_string().contains(what), "{what}: {e}");
            assert_eq!(e.kind(), ErrorKind::Config);
        }
    }

    #[test]
    fn error_labels() {
        let e = UblkError::Timeout {
            dev: proto::DEV_ID_ANY,
            cmd: "ADD_DEV",
            secs: 30,
        };
        assert_eq!(
            e.to_string(),
            "ublk (new device): ADD_DEV did not complete within 30 s"
        );
        let e = UblkError::Command {
            dev: 3,
            cmd: "START_DEV",
            source: io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert!(
            e.to_string().starts_with("ublk device 3: START_DEV: "),
            "{e}"
        );
        assert_eq!(e.kind(), ErrorKind::Io);
    }
}
