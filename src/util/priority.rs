//! Thread priority: the agent's replication threads (seal, batch, bridge,
//! drain) run at a lower CPU priority than the frontends that serve the
//! workload, so on a busy protected machine the workload gets the CPU first and
//! capture degrades (spill, bitmap) instead of the workload slowing down.

#![allow(unsafe_code)]

/// Lower the calling thread's priority to `nice` (0..=19; 0 leaves it alone).
/// Linux applies `setpriority(PRIO_PROCESS, tid)` to that one thread. A thread
/// that already runs at `nice` or lower priority (the whole process started
/// under `nice -n 19`, say) is left alone: this only ever lowers, it never
/// raises a priority someone else chose. A failure is logged and otherwise
/// ignored: priority is an optimisation, not a rule.
pub fn lower_this_thread(nice: i32) {
    if nice <= 0 {
        return;
    }
    let nice = nice.min(19);
    let tid = nix::unistd::gettid().as_raw();
    nix::errno::Errno::clear();
    // SAFETY: getpriority only reads its two integer arguments and returns the
    // thread's nice value; -1 is also a valid value, so errno (cleared above)
    // tells an error apart.
    let current = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
    if current == -1 && nix::errno::Errno::last_raw() != 0 {
        tracing::debug!(
            "cannot read thread priority: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if current >= nice {
        return;
    }
    // SAFETY: setpriority only reads its three integer arguments; with
    // PRIO_PROCESS and a thread id, Linux changes that thread's nice value and
    // touches no memory of this process.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r != 0 {
        tracing::debug!(
            "cannot lower thread priority to nice {nice}: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lowers_only_the_calling_thread() {
        let before = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let nice_of = |stat: &str| -> i64 {
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split(' ').nth(16).unwrap().parse().unwrap()
        };
        let main_nice = nice_of(&before);
        let child = std::thread::spawn(move || {
            super::lower_this_thread(7);
            nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap())
        })
        .join()
        .unwrap();
        // Never raised: a test run under `nice -n 19` stays at 19.
        assert_eq!(child, main_nice.max(7));
        let kept = std::thread::spawn(move || {
            super::lower_this_thread(12);
            super::lower_this_thread(7);
            nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(
            kept,
            main_nice.max(12),
            "a later, higher priority is not applied"
        );
        let after = nice_of(&std::fs::read_to_string("/proc/thread-self/stat").unwrap());
        assert_eq!(after, main_nice, "the calling test thread is unchanged");
    }
}
