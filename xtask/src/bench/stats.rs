//! Interleaved repetitions, their summaries, and Markdown tables.

use std::time::Instant;

use anyhow::Result;

use super::machine;

/// min / median / max of `n` measurements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Summary {
    /// Panics on an empty slice: every benchmark measures at least once.
    pub fn of(values: &[f64]) -> Summary {
        assert!(!values.is_empty(), "no measurements to summarise");
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Summary {
            n,
            min: sorted[0],
            median,
            max: sorted[n - 1],
        }
    }

    /// Min, median and max cells, each formatted by `format`.
    pub fn cells(&self, format: impl Fn(f64) -> String) -> [String; 3] {
        [format(self.min), format(self.median), format(self.max)]
    }
}

/// Element-wise `f(a, b)` of two per-repetition series (e.g. a variant's ratio to the baseline).
pub fn paired(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(&a, &b)| f(a, b)).collect()
}

/// The order of `variants` in repetition `rep`: rotated left by `rep`.
fn rotated<V: Copy>(variants: &[V], rep: usize) -> Vec<V> {
    let start = rep % variants.len();
    variants[start..]
        .iter()
        .chain(&variants[..start])
        .copied()
        .collect()
}

/// The recorded values of [`interleaved`]: per variant (in the order given), one value per
/// repetition, so that index `i` of every series comes from repetition `i`.
pub struct Runs<T> {
    pub series: Vec<Vec<T>>,
    /// Repetitions thrown away because other work ran on the machine meanwhile.
    pub discarded: usize,
}

impl<T> Runs<T> {
    /// One number per repetition of variant `index`.
    pub fn column(&self, index: usize, f: impl Fn(&T) -> f64) -> Vec<f64> {
        self.series[index].iter().map(f).collect()
    }

    /// ` (plus 2 repetitions discarded: ...)` when some were, else nothing.
    pub fn discarded_note(&self) -> String {
        if self.discarded == 0 {
            return String::new();
        }
        format!(
            " ({} more discarded because other processes used over {:.0}% of a CPU meanwhile)",
            self.discarded,
            NOISY_CPUS * 100.0
        )
    }
}

/// Other processes' average CPU use during a repetition above which a guarded repetition is
/// discarded, in CPUs.
const NOISY_CPUS: f64 = 0.2;

/// Runs `warmups` unrecorded repetitions, then `reps` recorded ones; every repetition measures
/// each variant once, in rotating order. When `guarded` (worth it for repetitions of seconds),
/// each repetition first waits for the machine to be quiet, and one during which other
/// processes used more than [`NOISY_CPUS`] is discarded and run again, up to `reps / 3` times.
pub fn interleaved<V: Copy, T>(
    what: &str,
    variants: &[(V, &str)],
    warmups: usize,
    reps: usize,
    guarded: bool,
    format: impl Fn(&T) -> String,
    mut measure: impl FnMut(V) -> Result<T>,
) -> Result<Runs<T>> {
    let mut runs = Runs {
        series: (0..variants.len())
            .map(|_| Vec::with_capacity(reps))
            .collect(),
        discarded: 0,
    };
    let max_discards = reps.div_ceil(3);
    let indices: Vec<usize> = (0..variants.len()).collect();
    let mut recorded = 0;
    // Counts every repetition run, discarded ones too, so that the order keeps rotating.
    for rep in 0.. {
        if recorded == reps {
            break;
        }
        let warmup = rep < warmups;
        let label = if warmup {
            format!("warm-up {}/{warmups}", rep + 1)
        } else {
            format!("repetition {}/{reps}", recorded + 1)
        };
        if guarded {
            machine::wait_for_quiet()?;
        }
        let cpu_before = machine::CpuUse::now()?;
        let started = Instant::now();
        let mut values: Vec<(usize, T)> = Vec::with_capacity(variants.len());
        let mut line = Vec::new();
        for i in rotated(&indices, rep) {
            let (variant, name) = variants[i];
            let value = measure(variant)?;
            line.push(format!("{name} {}", format(&value)));
            values.push((i, value));
        }
        let others =
            machine::CpuUse::now()?.others_since(&cpu_before) / started.elapsed().as_secs_f64();
        let noisy = guarded && others > NOISY_CPUS;
        let outcome = if warmup {
            ""
        } else if noisy && runs.discarded < max_discards {
            runs.discarded += 1;
            " [discarded]"
        } else {
            for (i, value) in values {
                runs.series[i].push(value);
            }
            recorded += 1;
            ""
        };
        eprintln!(
            "xtask: bench: {what}: {label}: {}; others {:.0}% of a CPU{outcome}",
            line.join(", "),
            others * 100.0
        );
    }
    Ok(runs)
}

/// A Markdown table: the first column left-aligned, the others right-aligned.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: impl IntoIterator<Item = String>) {
        let row: Vec<String> = cells.into_iter().collect();
        assert_eq!(row.len(), self.header.len(), "table row width");
        self.rows.push(row);
    }

    pub fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let rule: Vec<String> = (0..self.header.len())
            .map(|i| if i == 0 { ":--" } else { "--:" }.to_string())
            .collect();
        let mut text = line(&self.header);
        text.push_str(&line(&rule));
        for row in &self.rows {
            text.push_str(&line(row));
        }
        text
    }
}

pub fn seconds(s: f64) -> String {
    format!("{s:.2} s")
}

pub fn millis(s: f64) -> String {
    format!("{:.1} ms", s * 1e3)
}

pub fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1u64 << 20) as f64)
}

/// `×1.234`
pub fn ratio(r: f64) -> String {
    format!("×{r:.3}")
}

/// `+12.3%`
pub fn percent_change(r: f64) -> String {
    format!("{:+.1}%", (r - 1.0) * 100.0)
}

/// An integer with thousands separators (`1,572,864`).
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        let s = Summary::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.n, s.min, s.median, s.max), (3, 1.0, 2.0, 3.0));
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(Summary::of(&[7.0]).median, 7.0);
    }

    #[test]
    fn rotation_visits_every_order_start() {
        assert_eq!(rotated(&[0, 1, 2], 0), [0, 1, 2]);
        assert_eq!(rotated(&[0, 1, 2], 1), [1, 2, 0]);
        assert_eq!(rotated(&[0, 1, 2], 5), [2, 0, 1]);
    }

    #[test]
    fn interleaving_keeps_series_aligned() {
        let mut calls = Vec::new();
        let runs = interleaved(
            "t",
            &[('a', "a"), ('b', "b")],
            1,
            2,
            false,
            |v: &f64| v.to_string(),
            |v| {
                calls.push(v);
                Ok(if v == 'a' { 1.0 } else { 2.0 })
            },
        )
        .unwrap();
        assert_eq!(calls, ['a', 'b', 'b', 'a', 'a', 'b']);
        assert_eq!(runs.series, [vec![1.0, 1.0], vec![2.0, 2.0]]);
        assert_eq!(runs.discarded, 0);
    }

    #[test]
    fn formatting() {
        assert_eq!(count(1_572_864), "1,572,864");
        assert_eq!(count(999), "999");
        assert_eq!(percent_change(1.0234), "+2.3%");
        let mut t = Table::new(&["x", "y"]);
        t.row(["a".to_string(), "1".to_string()]);
        assert_eq!(t.markdown(), "| x | y |\n| :-- | --: |\n| a | 1 |\n");
    }
}
