//! The BPF object's programs: checking the kernel's tracepoint layouts, loading and attaching,
//! their kernel statistics, and detaching.

use super::{EbpfTracker, ProgramStats};
use crate::{
    error::LoadError,
    kernel::{self, Kernel},
    tasks::TaskRules,
    tracefs,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray, Queue, RingBuf},
    programs::TracePoint,
};
use std::{collections::HashMap as StdHashMap, collections::VecDeque, os::fd::AsFd as _};
use tracer_common::{
    MAP_COUNTERS, MAP_EVENTS, MAP_FREE_SLOTS, MAP_MMS, MAP_SEEDS, MAP_TASKS, MAP_TREES,
    MARKER_BYTES, MARKER_WORDS, MAX_TREES, format,
};

/// The BPF object, built from `tracer-ebpf` by build.rs.
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer.bpf.o"));

/// Programs and the tracepoints they attach to.
const PROGRAMS: [(&str, &str, &str); 4] = [
    ("rss_stat", "kmem", "rss_stat"),
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// Programs needed only to split a runner's tree into tasks: where tasks start (exec, with the
/// environment; one program for both exec calls), and how their root processes end.
const TASK_PROGRAMS: [(&str, &str, &str); 4] = [
    ("sys_enter_execve", "syscalls", "sys_enter_execve"),
    ("sys_enter_execve", "syscalls", "sys_enter_execveat"),
    ("sys_enter_exit_group", "syscalls", "sys_enter_exit_group"),
    ("signal_deliver", "signal", "signal_deliver"),
];

/// Globals of the task programs, in the order `task_offsets` returns their values.
const TASK_GLOBALS: [&str; 7] = [
    format::GLOBAL_EXEC_FILENAME,
    format::GLOBAL_EXECVE_ENVP,
    format::GLOBAL_EXECVEAT_ENVP,
    format::GLOBAL_EXIT_GROUP_CODE,
    format::GLOBAL_SIGNAL_SIG,
    format::GLOBAL_SIGNAL_HANDLER,
    format::GLOBAL_EXECVEAT_EVENT_ID,
];

/// Field offsets the task programs read, from the format files (and execveat's event id).
fn task_offsets(tracefs: &std::path::Path, exec: &tracefs::Format) -> Result<[u32; 7], LoadError> {
    let execve = tracefs::format(tracefs, "syscalls", "sys_enter_execve")?;
    let execveat = tracefs::format(tracefs, "syscalls", "sys_enter_execveat")?;
    let exit_group = tracefs::format(tracefs, "syscalls", "sys_enter_exit_group")?;
    let signal = tracefs::format(tracefs, "signal", "signal_deliver")?;
    Ok([
        exec.offset("filename", 4)?,
        execve.offset("envp", 8)?,
        execveat.offset("envp", 8)?,
        exit_group.offset("error_code", 8)?,
        signal.offset("sig", 4)?,
        signal.offset("sa_handler", 8)?,
        execveat.id(),
    ]
    .map(|offset| offset as u32))
}

/// `NAME=` as the exec program compares it: little-endian words, zero-padded, and their byte mask.
type Marker = ([u64; MARKER_WORDS], [u64; MARKER_WORDS], u32);

fn marker_words(name: &str) -> Result<Marker, LoadError> {
    let marker = format!("{name}=");
    if name.is_empty() || name.contains('=') || name.contains('\0') || marker.len() > MARKER_BYTES {
        return Err(LoadError::BadTaskMarker(name.to_string()));
    }
    let (mut words, mut masks) = ([0u64; MARKER_WORDS], [0u64; MARKER_WORDS]);
    for (index, byte) in marker.bytes().enumerate() {
        words[index / 8] |= u64::from(byte) << (8 * (index % 8));
        masks[index / 8] |= 0xff << (8 * (index % 8));
    }
    Ok((words, masks, marker.len() as u32))
}

/// `BPF_OBJ_GET_INFO_BY_FD` for a program (aya 0.14 does not expose `recursion_misses`).
fn program_info(fd: std::os::fd::BorrowedFd<'_>) -> Option<aya_obj::generated::bpf_prog_info> {
    use std::os::fd::AsRawFd as _;
    // The `info` member of `union bpf_attr`; the kernel accepts a shorter attr.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // SAFETY: plain integers; all-zero is a valid value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: attr points at a valid buffer of `info_len` bytes for the kernel to fill.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_int,
            &raw mut attr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    (ret == 0).then_some(info)
}

/// An `EbpfLoader` that does not relocate against kernel BTF: the object has no CO-RE relocations.
///
/// aya 0.14's `EbpfLoader::new()` always reads and parses `/sys/kernel/btf/vmlinux` (5 MB here),
/// which costs about 25 ms and 10 MB of tracer's RSS before `.btf(None)` can discard it. So the loader
/// is created in a helper thread that has its own filesystem context (`unshare(CLONE_FS)`) chrooted
/// into an empty directory, where that read fails at once; nothing else runs there, and the rest of
/// the process never sees the chroot. Without CAP_SYS_CHROOT it falls back to the plain constructor.
fn loader_without_kernel_btf() -> EbpfLoader<'static> {
    let empty = nix::unistd::mkdtemp(&std::env::temp_dir().join("tracer-loader-XXXXXX")).ok();
    let blind = empty.as_ref().and_then(|empty| {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)
                        .and_then(|()| nix::unistd::chroot(empty))
                        .and_then(|()| nix::unistd::chdir("/"))
                        .ok()
                        .map(|()| EbpfLoader::new())
                })
                .join()
                .ok()
                .flatten()
        })
    });
    if let Some(empty) = empty {
        let _ = std::fs::remove_dir(empty);
    }
    // Fallback: the default loader, which parses kernel BTF.
    let mut loader = blind.unwrap_or_default();
    loader.btf(None);
    loader
}

fn attach(ebpf: &mut Ebpf, program: &str, category: &str, name: &str) -> Result<(), LoadError> {
    let error = |source| LoadError::Program {
        program: program.to_string(),
        source,
    };
    let tracepoint: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| LoadError::Program {
            program: program.to_string(),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(error)?;
    // A program may serve several tracepoints: load it once.
    if tracepoint.fd().is_err() {
        tracepoint.load().map_err(error)?;
    }
    tracepoint.attach(category, name).map_err(error)?;
    Ok(())
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
    ebpf.take_map(name).ok_or(LoadError::MissingMap(name))
}

fn map_type(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> LoadError {
    move |source| LoadError::MapType { name, source }
}

impl EbpfTracker {
    /// Checks privileges and tracepoint layouts, then loads and attaches the programs.
    pub fn load() -> Result<EbpfTracker, LoadError> {
        EbpfTracker::load_with(None)
    }

    /// Like [`EbpfTracker::load`]; with `task_rules`, also the programs that split runner trees into
    /// tasks (see [`EbpfTracker::track_runner`]).
    pub fn load_with(task_rules: Option<TaskRules>) -> Result<EbpfTracker, LoadError> {
        let kernel = Kernel::current();
        kernel::check_privileges()?;
        kernel::check_host_pid_namespace()?;
        kernel.check_supported()?;
        let tracefs = tracefs::root()?;
        let rss_stat = tracefs::format(&tracefs, "kmem", "rss_stat").map_err(|err| match err {
            LoadError::MissingTracepoint { event } => LoadError::MissingTracepointOnKernel {
                event,
                kernel: kernel.release.clone(),
            },
            other => other,
        })?;
        for (field, offset, size) in format::RSS_STAT_FIELDS {
            let found = rss_stat.offset(field, size)?;
            if found != offset {
                return Err(LoadError::FormatMismatch {
                    event: "kmem:rss_stat".into(),
                    detail: format!(
                        "field `{field}` at offset {found}, the program reads {offset}"
                    ),
                });
            }
        }
        let fork = tracefs::format(&tracefs, "sched", "sched_process_fork")?;
        let exec = tracefs::format(&tracefs, "sched", "sched_process_exec")?;
        let exit = tracefs::format(&tracefs, "sched", "sched_process_exit")?;
        let offsets = [
            (
                format::GLOBAL_FORK_PARENT_PID,
                fork.offset("parent_pid", 4)?,
            ),
            (format::GLOBAL_FORK_CHILD_PID, fork.offset("child_pid", 4)?),
            (format::GLOBAL_EXEC_PID, exec.offset("pid", 4)?),
            (format::GLOBAL_EXEC_OLD_PID, exec.offset("old_pid", 4)?),
            (format::GLOBAL_EXIT_PID, exit.offset("pid", 4)?),
        ]
        .map(|(name, offset)| (name, offset as u32));
        let task_offsets = match &task_rules {
            Some(_) => task_offsets(&tracefs, &exec)?,
            None => [0; 7],
        };
        let (marker, marker_mask, marker_len) = match &task_rules {
            Some(rules) => marker_words(&rules.marker)?,
            None => ([0; MARKER_WORDS], [0; MARKER_WORDS], 0),
        };

        let mut loader = loader_without_kernel_btf();
        for (name, offset) in &offsets {
            loader.override_global(name, offset, true);
        }
        for (name, offset) in TASK_GLOBALS.iter().zip(&task_offsets) {
            loader.override_global(name, offset, true);
        }
        loader.override_global(format::GLOBAL_TASK_MARKER, &marker, true);
        loader.override_global(format::GLOBAL_TASK_MARKER_MASK, &marker_mask, true);
        loader.override_global(format::GLOBAL_TASK_MARKER_LEN, &marker_len, true);
        let mut ebpf = loader.load(BPF_OBJECT).map_err(LoadError::Object)?;
        for (program, category, name) in PROGRAMS {
            attach(&mut ebpf, program, category, name)?;
        }
        if task_rules.is_some() {
            for (program, category, name) in TASK_PROGRAMS {
                attach(&mut ebpf, program, category, name)?;
            }
        }
        let tasks =
            HashMap::try_from(take_map(&mut ebpf, MAP_TASKS)?).map_err(map_type(MAP_TASKS))?;
        let mms = HashMap::try_from(take_map(&mut ebpf, MAP_MMS)?).map_err(map_type(MAP_MMS))?;
        let seeds =
            HashMap::try_from(take_map(&mut ebpf, MAP_SEEDS)?).map_err(map_type(MAP_SEEDS))?;
        let trees =
            Array::try_from(take_map(&mut ebpf, MAP_TREES)?).map_err(map_type(MAP_TREES))?;
        let counters = PerCpuArray::try_from(take_map(&mut ebpf, MAP_COUNTERS)?)
            .map_err(map_type(MAP_COUNTERS))?;
        let mut free_slots = Queue::try_from(take_map(&mut ebpf, MAP_FREE_SLOTS)?)
            .map_err(map_type(MAP_FREE_SLOTS))?;
        for slot in 0..MAX_TREES {
            free_slots.push(slot, 0).map_err(map_type(MAP_FREE_SLOTS))?;
        }
        let events =
            RingBuf::try_from(take_map(&mut ebpf, MAP_EVENTS)?).map_err(map_type(MAP_EVENTS))?;
        Ok(EbpfTracker {
            ebpf,
            tasks,
            mms,
            seeds,
            trees,
            counters,
            active: StdHashMap::new(),
            roots: StdHashMap::new(),
            free_slots,
            cooling: VecDeque::new(),
            events,
            task_rules,
            task_info: StdHashMap::new(),
            kernel,
        })
    }

    /// Detaches the programs in a background process, so the caller can exit at once.
    ///
    /// Closing a tracepoint's last perf event waits for RCU grace periods in the kernel
    /// (`tracepoint_synchronize_unregister`): about 80 ms per program here, 300+ ms in all, which would
    /// otherwise sit between the command's end and tracer's exit. A forked child inherits the
    /// descriptors, waits until this process has exited (EOF on a pipe), then closes them; it holds no
    /// stdio, so a caller reading tracer's output is not kept waiting. Call it last, just before exit,
    /// from a single-threaded process.
    pub fn detach_in_background(self) {
        let Ok((parent_alive, parent_gone)) = nix::unistd::pipe() else {
            return drop(self);
        };
        // SAFETY: the process is single-threaded (documented requirement); the child only closes fds,
        // reads a pipe, and exits.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                drop(parent_gone);
                if let Ok(null) = std::fs::File::options()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
                {
                    for fd in 0..=2 {
                        unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), fd) };
                    }
                }
                let mut byte = [0u8; 1];
                let _ = nix::unistd::read(&parent_alive, &mut byte);
                drop(self);
                unsafe { libc::_exit(0) };
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => {
                drop(parent_alive);
                // Our copies close when we exit; the child's are then the last ones.
                std::mem::forget(parent_gone);
                std::mem::forget(self);
            }
            Err(_) => drop(self),
        }
    }

    /// Per program: runs and total run time so far (counted by the kernel only while
    /// `sysctl kernel.bpf_stats_enabled=1`, otherwise zeros) and skipped runs (always counted). Used by the benchmarks to tell this
    /// program's share of the per-event cost from the tracepoint's own.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        PROGRAMS
            .iter()
            .filter_map(|&(name, _, _)| {
                let info = program_info(self.ebpf.program(name)?.fd().ok()?.as_fd())?;
                Some(ProgramStats {
                    name,
                    runs: info.run_cnt,
                    run_time: std::time::Duration::from_nanos(info.run_time_ns),
                    missed: info.recursion_misses,
                })
            })
            .collect()
    }

    /// Events the kernel did not deliver to our programs: a tracepoint program is skipped when a BPF
    /// program already runs on that CPU, and counted in `bpf_prog_info.recursion_misses` (>= 5.12).
    pub(super) fn missed_events(&self) -> u64 {
        self.program_stats().iter().map(|stats| stats.missed).sum()
    }
}
