//! The high-water mark of resident memory that the OS keeps per process, where it keeps one.
//!
//! Linux: `VmHWM` from `/proc/PID/status`. Windows: `PeakWorkingSetSize`. macOS exposes no RSS
//! high-water mark for other processes (only `ru_maxrss` of one's own children, which `tracer run`
//! uses after the command is reaped), so it returns `None` there.

/// The largest resident size `pid` has had so far, in bytes.
#[cfg(target_os = "linux")]
pub fn process_peak(pid: u32) -> Option<u64> {
    crate::proc::status_bytes(pid, &["VmHWM"]).and_then(|values| values.first().copied())
}

#[cfg(windows)]
pub fn process_peak(pid: u32) -> Option<u64> {
    use windows_sys::Win32::{
        Foundation::CloseHandle,
        System::{
            ProcessStatus::{GetProcessMemoryInfo, PROCESS_MEMORY_COUNTERS},
            Threading::{OpenProcess, PROCESS_QUERY_LIMITED_INFORMATION},
        },
    };
    // SAFETY: plain Win32 calls on a handle we open and close here; the counters struct is sized.
    unsafe {
        let handle = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, 0, pid);
        if handle.is_null() {
            return None;
        }
        let mut counters: PROCESS_MEMORY_COUNTERS = std::mem::zeroed();
        counters.cb = std::mem::size_of::<PROCESS_MEMORY_COUNTERS>() as u32;
        let ok = GetProcessMemoryInfo(handle, &mut counters, counters.cb);
        CloseHandle(handle);
        (ok != 0).then_some(counters.PeakWorkingSetSize as u64)
    }
}

#[cfg(not(any(target_os = "linux", windows)))]
pub fn process_peak(_pid: u32) -> Option<u64> {
    None
}
