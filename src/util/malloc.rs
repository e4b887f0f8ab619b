//! Allocator tuning for the long-running roles.
//!
//! glibc's malloc gives large blocks back to the kernel when they are freed
//! (`munmap` of blocks above the mmap threshold, trimming of the heap top) and
//! takes fresh pages again for the next frame. On virtual machines that report
//! freed guest pages to the host (virtio free page reporting, as on the machines
//! this is developed on), a page taken again costs a host fault and a zeroing:
//! about 1 ns per byte measured here, as much as compressing the byte. The roles
//! allocate and free multi-MiB frame buffers all the time, so they ask glibc to
//! keep freed memory for reuse instead. Peak RSS, which the memory bars bound,
//! does not change: memory is reused, not added.

/// Largest mmap threshold glibc accepts on 64-bit targets (32 MiB): blocks
/// below it come from the heap, whose freed memory is reused.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Keep up to this much free memory at the heap top instead of trimming it.
const TRIM_THRESHOLD: i32 = 256 << 20;
/// One malloc arena: each arena keeps its own freed memory, and buffers are
/// allocated on one thread and freed on another (frames move from seal threads
/// to the session, from the socket reader to the spool writer), so with an arena
/// per thread every arena grows to its own peak. One arena kept the agent's peak
/// RSS about 25 MiB lower in `tidemark bench` than two, at the same throughput;
/// the roles allocate large buffers, not many small ones, so the lock is cheap.
const ARENA_MAX: i32 = 1;

/// Keep freed memory in the process for reuse (glibc only; elsewhere a no-op).
/// Returns whether every setting was accepted.
#[allow(unsafe_code)]
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes one of glibc's allocator parameters; it
        // takes plain integers, touches no memory of ours, and is safe to call at
        // any time (glibc serialises it with the allocator's own lock).
        let mmap = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        // SAFETY: as above.
        let trim = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) };
        // SAFETY: as above.
        let arenas = unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) };
        mmap == 1 && trim == 1 && arenas == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_the_settings() {
        assert!(super::keep_freed_memory());
        // Allocations still work as before.
        let v = vec![7u8; 8 << 20];
        assert_eq!(v[v.len() - 1], 7);
    }
}
