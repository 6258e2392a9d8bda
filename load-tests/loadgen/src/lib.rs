//! What the load generators share: latency figures and their HdrHistogram percentile files.
//! Histograms hold microseconds; figures and files are in milliseconds.

use std::io::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;

/// The `q` quantile of `histogram` in milliseconds.
pub fn ms(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64 / 1000.0
}

/// Writes `histogram` to `path` in HdrHistogram's percentile format, in milliseconds (what
/// load-tests/plot and HdrHistogram's own plotter read).
pub fn write_hgrm(path: &Path, histogram: &Histogram<u64>) -> anyhow::Result<()> {
    let mut out = std::fs::File::create(path)?;
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    for v in histogram.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 {
            1.0 / (1.0 - q)
        } else {
            f64::INFINITY
        };
        writeln!(
            out,
            "{:>12.3} {:>14.12} {:>10} {:>14.2}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inverse
        )?;
    }
    writeln!(
        out,
        "#[Mean = {:.3}, StdDeviation = {:.3}]\n#[Max = {:.3}, Total count = {}]",
        histogram.mean() / 1000.0,
        histogram.stdev() / 1000.0,
        histogram.max() as f64 / 1000.0,
        histogram.len()
    )?;
    Ok(())
}
