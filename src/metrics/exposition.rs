//! The Prometheus text format of one scrape, written by prometheus-client.

use super::process::sample;
use super::{CloseReason, DropReason, Metrics, Totals, Transport};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// The text of `/metrics` for one scrape.
///
/// `is_ready` is what `/readyz` would answer now: every listener served, not draining.
pub(super) fn render(metrics: Metrics, is_ready: bool) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { metrics, is_ready }));
    let mut text = String::new();
    // Writing into a String cannot fail, and every collector below only formats numbers.
    if prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).is_err() {
        text.clear();
    }
    text
}

/// The content type of [`render`]'s text.
pub(super) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Debug)]
struct Scrape {
    metrics: Metrics,
    is_ready: bool,
}

type Labels = Vec<(&'static str, &'static str)>;

/// Counts print as integers; times and rates as reals.
#[derive(Clone, Copy, Debug)]
enum Value {
    Count(u64),
    Real(f64),
}

/// One family: name (without unit or `_total`), help, unit, type, and its series.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    kind: MetricType,
    series: impl IntoIterator<Item = (Labels, Value)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, unit, kind)?;
    for (labels, value) in series {
        let labelled = metric.encode_family(&labels)?;
        match (kind, value) {
            (MetricType::Counter, Value::Count(n)) => ConstCounter::new(n).encode(labelled)?,
            (MetricType::Counter, Value::Real(x)) => ConstCounter::new(x).encode(labelled)?,
            (_, Value::Count(n)) => ConstGauge::new(n as i64).encode(labelled)?,
            (_, Value::Real(x)) => ConstGauge::new(x).encode(labelled)?,
        }
    }
    Ok(())
}

fn per_transport(
    transports: &[Transport],
    value: impl Fn(Transport) -> u64,
) -> Vec<(Labels, Value)> {
    transports
        .iter()
        .map(|&t| (vec![("transport", t.label())], Value::Count(value(t))))
        .collect()
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals: &Totals = &self.metrics.totals();
        let all = Transport::ALL;
        let streams: Vec<Transport> = all.into_iter().filter(|t| t.is_stream()).collect();
        let datagrams: Vec<Transport> = all.into_iter().filter(|t| !t.is_stream()).collect();
        let counter = MetricType::Counter;
        let gauge = MetricType::Gauge;
        let e = &mut encoder;
        family(
            e,
            "reverb_connections_accepted",
            "Stream connections accepted and admitted.",
            None,
            counter,
            per_transport(&streams, |t| totals.accepted(t)),
        )?;
        family(
            e,
            "reverb_connections_refused",
            "Stream connections refused by --max-conns.",
            None,
            counter,
            per_transport(&streams, |t| totals.refused(t)),
        )?;
        family(
            e,
            "reverb_connections_open",
            "Stream connections open now.",
            None,
            gauge,
            per_transport(&streams, |t| totals.open(t)),
        )?;
        let closed = streams.iter().flat_map(|&t| {
            CloseReason::ALL.iter().map(move |&reason| {
                (
                    vec![("transport", t.label()), ("reason", reason.label())],
                    Value::Count(totals.closed(t, reason)),
                )
            })
        });
        family(
            e,
            "reverb_connections_closed",
            "Stream connections closed, by reason.",
            None,
            counter,
            closed.collect::<Vec<_>>(),
        )?;
        family(
            e,
            "reverb_received",
            "Bytes received from peers.",
            Some(&Unit::Bytes),
            counter,
            per_transport(&all, |t| totals.received_bytes(t)),
        )?;
        family(
            e,
            "reverb_sent",
            "Bytes the kernel took for peers.",
            Some(&Unit::Bytes),
            counter,
            per_transport(&all, |t| totals.sent_bytes(t)),
        )?;
        family(
            e,
            "reverb_datagrams_received",
            "Datagrams received.",
            None,
            counter,
            per_transport(&datagrams, |t| totals.get(t, super::DATAGRAMS_RECEIVED)),
        )?;
        family(
            e,
            "reverb_datagrams_answered",
            "Datagrams answered.",
            None,
            counter,
            per_transport(&datagrams, |t| totals.get(t, super::DATAGRAMS_ANSWERED)),
        )?;
        let dropped = datagrams.iter().flat_map(|&t| {
            DropReason::ALL.iter().map(move |&reason| {
                (
                    vec![("transport", t.label()), ("reason", reason.label())],
                    Value::Count(totals.get(t, super::DROPPED + reason as usize)),
                )
            })
        });
        family(
            e,
            "reverb_datagrams_dropped",
            "Datagrams not answered, by reason.",
            None,
            counter,
            dropped.collect::<Vec<_>>(),
        )?;
        family(
            e,
            "reverb_handler_panics",
            "Protocol handler panics.",
            None,
            counter,
            per_transport(&all, |t| totals.get(t, super::HANDLER_PANICS)),
        )?;
        family(
            e,
            "reverb_accept_pauses",
            "Accept pauses for lack of descriptors or memory.",
            None,
            counter,
            per_transport(&streams, |t| totals.get(t, super::ACCEPT_PAUSES)),
        )?;
        family(
            e,
            "reverb_ready",
            "1 once every listener is served, 0 while draining.",
            None,
            gauge,
            [(Labels::new(), Value::Count(u64::from(self.is_ready)))],
        )?;
        if let Some(process) = sample(self.metrics.server_pid()) {
            let one = |value: Value| [(Labels::new(), value)];
            family(
                e,
                "process_cpu",
                "User and system CPU time spent.",
                Some(&Unit::Seconds),
                counter,
                one(Value::Real(process.cpu_seconds)),
            )?;
            family(
                e,
                "process_resident_memory",
                "Resident memory size.",
                Some(&Unit::Bytes),
                gauge,
                one(Value::Count(process.resident_memory_bytes)),
            )?;
            family(
                e,
                "process_virtual_memory",
                "Virtual memory size.",
                Some(&Unit::Bytes),
                gauge,
                one(Value::Count(process.virtual_memory_bytes)),
            )?;
            family(
                e,
                "process_start_time",
                "Start time since the Unix epoch.",
                Some(&Unit::Seconds),
                gauge,
                one(Value::Real(process.start_time_seconds)),
            )?;
            family(
                e,
                "process_open_fds",
                "Open file descriptors.",
                None,
                gauge,
                one(Value::Count(process.open_fds)),
            )?;
            if let Some(max_fds) = process.max_fds {
                family(
                    e,
                    "process_max_fds",
                    "The open file descriptor limit.",
                    None,
                    gauge,
                    one(Value::Count(max_fds)),
                )?;
            }
        }
        Ok(())
    }
}
