//! The control device, `/dev/ublk-control`: ADD_DEV, SET_PARAMS, START_DEV,
//! GET_DEV_INFO, STOP_DEV and DEL_DEV, each a uring command on the control
//! ring, waited for with a timeout, its negative result mapped to
//! [`UblkError`].

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::proto::{
    CMD_ADD_DEV, CMD_DEL_DEV, CMD_GET_DEV_INFO, CMD_SET_PARAMS, CMD_START_DEV, CMD_STOP_DEV,
    CtrlCmd, DEV_INFO_LEN, DevInfo, Params, cmd_name,
};
use super::sys::CtrlRing;
use super::{UblkError, open_control};

/// How long one control command may take. START_DEV waits for every queue to
/// have fetched (they have by then), STOP_DEV for the requests in flight to be
/// answered, DEL_DEV for the device's last reference to go.
const CTRL_TIMEOUT: Duration = Duration::from_secs(30);

/// `ENOTSUPP` (kernel-internal, 524): what drivers before ioctl-encoded
/// commands answered to an opcode they did not know.
const ENOTSUPP: i32 = 524;

/// The open control device and its ring.
pub(crate) struct Control {
    path: PathBuf,
    file: File,
    ring: CtrlRing,
}

impl Control {
    /// Open `path` (normally `/dev/ublk-control`) and set up the ring.
    pub fn open(path: &Path) -> Result<Self, UblkError> {
        let file = open_control(path)?;
        let ring = CtrlRing::new().map_err(UblkError::Uring)?;
        Ok(Control {
            path: path.to_path_buf(),
            file,
            ring,
        })
    }

    /// Run `op` for `dev` with `buf` as its buffer; returns the buffer.
    fn run(&mut self, op: u32, cmd: CtrlCmd, buf: Vec<u8>) -> Result<Vec<u8>, UblkError> {
        let dev = cmd.dev_id;
        let name = cmd_name(op);
        let (res, buf) = self
            .ring
            .run(self.file.as_fd(), op, cmd, buf, CTRL_TIMEOUT)
            .map_err(|e| match e.kind() {
                io::ErrorKind::TimedOut => UblkError::Timeout {
                    dev,
                    cmd: name,
                    secs: CTRL_TIMEOUT.as_secs(),
                },
                _ => UblkError::Uring(e),
            })?;
        if res >= 0 {
            return Ok(buf);
        }
        let source = io::Error::from_raw_os_error(-res);
        Err(match -res {
            libc::EPERM | libc::EACCES => UblkError::Permission {
                path: self.path.clone(),
            },
            libc::EOPNOTSUPP | ENOTSUPP if op == CMD_ADD_DEV => UblkError::OldKernel { source },
            _ => UblkError::Command {
                dev,
                cmd: name,
                source,
            },
        })
    }

    /// ADD_DEV: create `/dev/ublkcN` as `want` asks (`dev_id` may be
    /// `DEV_ID_ANY`); returns what the driver granted.
    pub fn add_dev(&mut self, want: &DevInfo) -> Result<DevInfo, UblkError> {
        let buf = self.run(
            CMD_ADD_DEV,
            CtrlCmd::new(want.dev_id),
            want.encode().to_vec(),
        )?;
        DevInfo::decode(&buf).ok_or_else(|| UblkError::Command {
            dev: want.dev_id,
            cmd: "ADD_DEV",
            source: io::Error::other("short device info"),
        })
    }

    /// SET_PARAMS: sizes and limits, before START_DEV.
    pub fn set_params(&mut self, dev: u32, p: &Params) -> Result<(), UblkError> {
        self.run(CMD_SET_PARAMS, CtrlCmd::new(dev), p.encode().to_vec())
            .map(drop)
    }

    /// START_DEV: `/dev/ublkbN` appears; `pid` is the serving process.
    pub fn start_dev(&mut self, dev: u32, pid: i32) -> Result<(), UblkError> {
        let mut cmd = CtrlCmd::new(dev);
        cmd.data0 = pid as u64;
        self.run(CMD_START_DEV, cmd, Vec::new()).map(drop)
    }

    /// GET_DEV_INFO: the device's state as the driver has it.
    pub fn dev_info(&mut self, dev: u32) -> Result<DevInfo, UblkError> {
        let buf = self.run(CMD_GET_DEV_INFO, CtrlCmd::new(dev), vec![0; DEV_INFO_LEN])?;
        DevInfo::decode(&buf).ok_or_else(|| UblkError::Command {
            dev,
            cmd: "GET_DEV_INFO",
            source: io::Error::other("short device info"),
        })
    }

    /// STOP_DEV: remove `/dev/ublkbN` (in-flight requests are answered first)
    /// and abort every fetch, which ends the queues.
    pub fn stop_dev(&mut self, dev: u32) -> Result<(), UblkError> {
        self.run(CMD_STOP_DEV, CtrlCmd::new(dev), Vec::new())
            .map(drop)
    }

    /// DEL_DEV: remove `/dev/ublkcN`; the driver waits until the device's
    /// number is free (its character device closed, its disk released).
    pub fn del_dev(&mut self, dev: u32) -> Result<(), UblkError> {
        self.run(CMD_DEL_DEV, CtrlCmd::new(dev), Vec::new())
            .map(drop)
    }
}
