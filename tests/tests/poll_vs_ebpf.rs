//! What polling misses on spiky trees, next to what eBPF reports, on the same workloads.
//!
//! eBPF must match the oracle (tolerance as everywhere). Polling is reported with its error, not
//! held to the oracle: spikes shorter than the interval are invisible to it. What must always hold
//! is `peak_rss_bytes >= largest_process_peak_bytes`: the OS's per-process high-water mark is a true
//! lower bound of the tree's peak.

mod common;
use common::trace_workload_with;

const SPIKY: [&[&str]; 4] = [
    &[
        "spike",
        "--mib",
        "256",
        "--hold-ms",
        "1",
        "--tail-ms",
        "300",
    ],
    &["together", "--children", "4", "--mib", "64"],
    &["sequential", "--children", "4", "--mib", "100"],
    &["nested", "--depth", "4", "--mib", "32"],
];

#[test]
fn spiky_trees_ebpf_exact_poll_with_its_error() {
    require_ebpf!();
    for args in SPIKY {
        let name = args.join(" ");
        let ebpf = trace_workload_with(&["--backend", "ebpf"], args);
        ebpf.assert_exact_peak(&format!("eBPF, {name}"));
        let poll = trace_workload_with(&["--backend", "poll"], args);
        assert!(poll.output.status.success(), "{}", poll.stderr());
        let report = &poll.report;
        assert_eq!(report["backend"], "poll");
        assert_eq!(report["exact"], false);
        let peak = poll.peak();
        let largest = report["largest_process_peak_bytes"]
            .as_u64()
            .expect("VmHWM on Linux");
        assert!(
            peak >= largest,
            "{name}: poll peak {peak} below a single process's peak {largest}"
        );
        let truth = poll.oracle_bytes();
        eprintln!(
            "{name}: truth {truth} B, eBPF {} B ({:+.2}%), poll@100ms {peak} B ({:+.1}%), largest process {largest} B",
            ebpf.peak(),
            percent(ebpf.peak(), ebpf.oracle_bytes()),
            percent(peak, truth),
        );
    }
}

fn percent(value: u64, truth: u64) -> f64 {
    (value as f64 - truth as f64) / truth as f64 * 100.0
}
