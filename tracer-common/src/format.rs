//! Where the BPF programs read `kmem:rss_stat` fields.
//!
//! Tracepoint context reads must use an offset encoded in the load instruction (the verifier refuses a
//! ctx pointer with a variable offset), so the hot path hard-codes these and userspace refuses to load
//! when `/sys/kernel/tracing/events/kmem/rss_stat/format` disagrees. The same layout holds on 5.5 to
//! 6.18 (checked on 6.1, 6.12 and 6.18). The rarer `sched_*` events read through offsets passed as
//! globals instead, because their layout did change (`comm` became `__data_loc` around 6.16).

/// `(field name, offset, size)` of each `rss_stat` field the program reads.
pub const RSS_STAT_FIELDS: [(&str, usize, usize); 4] = [
    ("mm_id", RSS_STAT_MM_ID, 4),
    ("curr", RSS_STAT_CURR, 4),
    ("member", RSS_STAT_MEMBER, 4),
    ("size", RSS_STAT_SIZE, 8),
];

pub const RSS_STAT_MM_ID: usize = 8;
pub const RSS_STAT_CURR: usize = 12;
pub const RSS_STAT_MEMBER: usize = 16;
pub const RSS_STAT_SIZE: usize = 24;

/// Names of the globals holding `sched_*` field offsets (set by userspace from the format files).
pub const GLOBAL_FORK_PARENT_PID: &str = "FORK_PARENT_PID_OFFSET";
pub const GLOBAL_FORK_CHILD_PID: &str = "FORK_CHILD_PID_OFFSET";
pub const GLOBAL_EXEC_PID: &str = "EXEC_PID_OFFSET";
pub const GLOBAL_EXEC_OLD_PID: &str = "EXEC_OLD_PID_OFFSET";
pub const GLOBAL_EXIT_PID: &str = "EXIT_PID_OFFSET";
pub const GLOBAL_EXEC_FILENAME: &str = "EXEC_FILENAME_OFFSET";
pub const GLOBAL_EXECVE_ENVP: &str = "EXECVE_ENVP_OFFSET";
pub const GLOBAL_EXECVEAT_ENVP: &str = "EXECVEAT_ENVP_OFFSET";
pub const GLOBAL_EXECVEAT_EVENT_ID: &str = "EXECVEAT_EVENT_ID";
pub const GLOBAL_EXIT_GROUP_CODE: &str = "EXIT_GROUP_CODE_OFFSET";
pub const GLOBAL_SIGNAL_SIG: &str = "SIGNAL_SIG_OFFSET";
pub const GLOBAL_SIGNAL_HANDLER: &str = "SIGNAL_HANDLER_OFFSET";
/// The environment marker (`NAME=`, NUL-padded to `MARKER_BYTES`) and its length (0: none).
pub const GLOBAL_TASK_MARKER: &str = "TASK_MARKER";
pub const GLOBAL_TASK_MARKER_LEN: &str = "TASK_MARKER_LEN";
pub const GLOBAL_TASK_MARKER_MASK: &str = "TASK_MARKER_MASK";
