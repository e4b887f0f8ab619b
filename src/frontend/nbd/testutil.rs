//! Test harness shared by the server tests: a server on its own runtime over
//! a temp-file [`BackingDisk`], a small blocking NBD client for the malformed
//! cases, disks that fail or stall on purpose, and child-process helpers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::proto::*;
use super::{NbdConfig, NbdError, NbdExport, NbdListen, NbdServer, NbdStats, NbdStatsSnapshot};
use crate::capture::backing::BackingDisk;
use crate::frontend::{BlockIo, IoError, IoErrorKind, Op};
use crate::util::shutdown::{self, Trigger};

/// Every socket read in the test client gives up after this long.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A temp dir with a disk image of `size` bytes filled with `fill`.
pub fn disk_file(dir: &Path, name: &str, size: u64, fill: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![fill; size as usize]).unwrap();
    p
}

/// A [`BackingDisk`] export named `name` on `path`.
pub fn export(name: &str, path: &Path) -> NbdExport {
    NbdExport {
        name: name.into(),
        description: format!("test disk {name}"),
        disk: Arc::new(BackingDisk::open(path).unwrap()),
    }
}

/// A running server on its own multi-threaded runtime.
pub struct TestServer {
    pub rt: tokio::runtime::Runtime,
    trigger: Trigger,
    handle: Option<tokio::task::JoinHandle<Result<(), NbdError>>>,
    pub addrs: Vec<NbdListen>,
    pub stats: Arc<NbdStats>,
}

impl TestServer {
    /// Bind `cfg` (listen addresses filled in when empty: 127.0.0.1:0) and run.
    pub fn start(mut cfg: NbdConfig, exports: Vec<NbdExport>) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        if cfg.listen.is_empty() {
            cfg.listen
                .push(NbdListen::Tcp("127.0.0.1:0".parse().unwrap()));
        }
        let server = rt.block_on(NbdServer::bind(cfg, exports)).unwrap();
        let addrs = server.local_addrs();
        let stats = server.stats();
        let (trigger, sd) = shutdown::channel();
        let handle = rt.spawn(server.run(sd));
        TestServer {
            rt,
            trigger,
            handle: Some(handle),
            addrs,
            stats,
        }
    }

    /// The first TCP address.
    pub fn tcp(&self) -> SocketAddr {
        self.addrs
            .iter()
            .find_map(|a| match a {
                NbdListen::Tcp(a) => Some(*a),
                NbdListen::Unix(_) => None,
            })
            .expect("server has a TCP listener")
    }

    /// `nbd://127.0.0.1:port/export`.
    pub fn uri(&self, export: &str) -> String {
        NbdListen::Tcp(self.tcp()).uri(export)
    }

    /// Fire the shutdown signal and wait (bounded) for `run` to return.
    pub fn stop(mut self) -> NbdStatsSnapshot {
        self.trigger.fire();
        let h = self.handle.take().unwrap();
        let r = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), h).await })
            .expect("server stopped within 30 s")
            .expect("server task did not panic");
        r.expect("server run returned Ok");
        self.stats.snapshot()
    }

    /// Wait (bounded) until `cond` holds on the counters.
    pub fn wait_stats(&self, what: &str, cond: impl Fn(&NbdStatsSnapshot) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.stats.snapshot();
            if cond(&s) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.trigger.fire();
    }
}

/// Anything the test client can talk over.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A minimal blocking NBD client that can also misbehave.
pub struct Client {
    pub s: Box<dyn Stream>,
    tcp: Option<TcpStream>,
}

/// One option reply: type and data.
pub type OptReply = (u32, Vec<u8>);

impl Client {
    pub fn tcp(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        let tcp = Some(s.try_clone().unwrap());
        Client {
            s: Box::new(s),
            tcp,
        }
    }

    pub fn unix(path: &Path) -> Client {
        let s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Client {
            s: Box::new(s),
            tcp: None,
        }
    }

    /// A client over an already set-up stream (e.g. TLS).
    pub fn over(s: Box<dyn Stream>) -> Client {
        Client { s, tcp: None }
    }

    /// Another handle on the TCP socket (for a second writer thread).
    pub fn tcp_clone(&self) -> TcpStream {
        self.tcp
            .as_ref()
            .expect("a TCP client")
            .try_clone()
            .unwrap()
    }

    /// Read the greeting and send client flags (fixed newstyle, no zeroes).
    pub fn greet(&mut self) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        self.s.write_all(&3u32.to_be_bytes()).unwrap();
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        self.try_send_option(option, data).unwrap();
    }

    pub fn try_send_option(&mut self, option: u32, data: &[u8]) -> std::io::Result<()> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        self.s.write_all(&v)?;
        self.s.flush()
    }

    /// Read one option reply.
    pub fn option_reply(&mut self) -> std::io::Result<OptReply> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        assert_eq!(&h[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d)?;
        Ok((typ, d))
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn option_replies(&mut self) -> Vec<OptReply> {
        let mut v = Vec::new();
        loop {
            let r = self.option_reply().unwrap();
            let last = r.0 == REP_ACK || r.0 & REP_FLAG_ERROR != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// `NBD_OPT_GO` for `name`; returns the final reply type, size and flags.
    pub fn go(&mut self, name: &str) -> (u32, u64, u16) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &d);
        let (mut size, mut flags) = (0, 0);
        for (typ, data) in self.option_replies() {
            if typ == REP_INFO && data[..2] == INFO_EXPORT.to_be_bytes() {
                size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
            }
            if typ != REP_INFO {
                return (typ, size, flags);
            }
        }
        unreachable!("option_replies ends with a final reply")
    }

    /// Greet and GO; panics unless the export is entered.
    pub fn connect_export(&mut self, name: &str) -> (u64, u16) {
        self.greet();
        let (typ, size, flags) = self.go(name);
        assert_eq!(typ, REP_ACK, "GO {name:?} failed");
        (size, flags)
    }

    pub fn send_request(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut v = Vec::with_capacity(REQUEST_HEADER_LEN);
        RequestHeader {
            flags,
            typ,
            cookie,
            offset,
            len,
        }
        .encode(&mut v);
        self.s.write_all(&v).unwrap();
    }

    /// Read one simple reply (with `data_len` bytes of data when it succeeds).
    pub fn reply(&mut self, data_len: usize) -> std::io::Result<(u32, u64, Vec<u8>)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut d = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.s.read_exact(&mut d)?;
        Ok((error, cookie, d))
    }

    /// A request with optional payload; returns the error and read data.
    pub fn call(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        self.send_request(typ, flags, 0xc0ffee, offset, len);
        self.s.write_all(payload).unwrap();
        let n = if typ == CMD_READ { len as usize } else { 0 };
        let (e, cookie, d) = self.reply(n).unwrap();
        assert_eq!(cookie, 0xc0ffee);
        (e, d)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.call(CMD_WRITE, 0, offset, data.len() as u32, data).0
    }

    pub fn read(&mut self, offset: u64, len: u32) -> (u32, Vec<u8>) {
        self.call(CMD_READ, 0, offset, len, &[])
    }

    /// Send NBD_CMD_DISC and wait for the server to close.
    pub fn disconnect(mut self) {
        self.send_request(CMD_DISC, 0, 0, 0, 0);
        assert!(self.at_eof(), "server closes after NBD_CMD_DISC");
    }

    /// True when the server closed the connection (EOF or reset) before
    /// sending anything more.
    pub fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
        }
    }
}

/// A disk whose calls fail with a chosen errno, or stall until released.
pub struct FaultyDisk {
    pub inner: BackingDisk,
    pub errno: Option<i32>,
    pub read_only: bool,
    /// While set, writes wait (bounded) for it to clear.
    pub stall: AtomicBool,
    /// While set, flushes wait (bounded) for it to clear.
    pub stall_flush: AtomicBool,
}

impl FaultyDisk {
    pub fn new(path: &Path) -> Self {
        FaultyDisk {
            inner: BackingDisk::open(path).unwrap(),
            errno: None,
            read_only: false,
            stall: AtomicBool::new(false),
            stall_flush: AtomicBool::new(false),
        }
    }

    fn fail(&self, op: Op, offset: u64, len: u64) -> Result<(), IoError> {
        match self.errno {
            Some(e) => Err(IoError::new(
                op,
                offset,
                len,
                IoErrorKind::Backing(std::io::Error::from_raw_os_error(e)),
            )),
            None => Ok(()),
        }
    }
}

impl BlockIo for FaultyDisk {
    fn size(&self) -> u64 {
        BlockIo::size(&self.inner)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.fail(Op::Read, offset, buf.len() as u64)?;
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError> {
        wait_while(&self.stall);
        if self.read_only {
            return Err(IoError::new(
                Op::Write,
                offset,
                data.len() as u64,
                IoErrorKind::ReadOnly,
            ));
        }
        self.fail(Op::Write, offset, data.len() as u64)?;
        self.inner.write_at(offset, data, fua)
    }
    fn flush(&self) -> Result<(), IoError> {
        wait_while(&self.stall_flush);
        self.fail(Op::Flush, 0, 0)?;
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), IoError> {
        self.fail(Op::Trim, offset, len)?;
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        self.fail(Op::WriteZeroes, offset, len)?;
        self.inner.write_zeroes(offset, len, may_unmap, fua)
    }
}

/// Wait (at most 20 s) while `flag` is set.
fn wait_while(flag: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while flag.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The path of a required external tool; panics naming it when missing, so a
/// test never passes silently without it.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required tool `{name}` not found in PATH; install it \
         (apt-get install libnbd-bin fio qemu-utils) — this test needs it"
    );
}

/// What a finished child process left.
#[derive(Debug)]
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Run `cmd` with a deadline; kills the child (by its PID, through the
/// `Child` handle) when it runs over, and panics.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Run and require exit status 0.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let o = run(cmd, limit);
    assert!(
        o.status.success(),
        "{desc} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        o.stdout,
        o.stderr
    );
    o
}

/// `len` bytes of seeded pseudo-random data.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    crate::util::prng::Prng::new(seed).fill(&mut v);
    v
}
