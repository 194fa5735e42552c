//! Label escaping against the exposition grammar: a label value made of any bytes (decoded as
//! the agent decodes process names, lossily), written by prometheus-client through the
//! agent's label type, gives exactly one sample line whose quoted value follows the grammar
//! (only `\\`, `\"` and `\n` escapes; no raw quote, backslash or newline) and unescapes to the
//! original. The Prometheus text format and OpenMetrics share this label value grammar.
#![no_main]

use insite_agent_fuzz::labels::{LabelValue, Labels};
use libfuzzer_sys::fuzz_target;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{gauge::ConstGauge, MetricType},
    registry::Registry,
};

#[derive(Debug)]
struct One(String);

impl Collector for One {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut m = enc.encode_descriptor("fuzz", "Fuzzed label", None, MetricType::Gauge)?;
        let labels: Labels = vec![
            ("v".into(), LabelValue::from(self.0.clone())),
            ("k".into(), "x".into()),
        ];
        ConstGauge::new(1.0).encode(m.encode_family(&labels)?)
    }
}

/// The value of `v` in a sample line `fuzz{v="...",k="x"} 1.0`, unescaped; panics on anything
/// the grammar does not allow.
fn parse(line: &str) -> String {
    let rest = line
        .strip_prefix("fuzz{v=\"")
        .expect("sample starts with the family and label");
    let mut out = String::new();
    let mut chars = rest.chars();
    loop {
        match chars.next().expect("label value is closed") {
            '\\' => match chars.next().expect("escape is complete") {
                'n' => out.push('\n'),
                '\\' => out.push('\\'),
                '"' => out.push('"'),
                c => panic!("invalid escape \\{c}"),
            },
            '"' => break,
            '\n' => panic!("raw newline in a label value"),
            c => out.push(c),
        }
    }
    assert_eq!(
        chars.as_str(),
        ",k=\"x\"} 1.0",
        "nothing may follow but the next label"
    );
    out
}

fuzz_target!(|data: &[u8]| {
    let value = String::from_utf8_lossy(data).into_owned();
    let mut reg = Registry::default();
    reg.register_collector(Box::new(One(value.clone())));
    let mut om = String::new();
    prometheus_client::encoding::text::encode(&mut om, &reg).expect("encodes");
    let lines: Vec<&str> = om.lines().collect();
    assert_eq!(lines.len(), 4, "HELP, TYPE, one sample, EOF: {om:?}");
    assert_eq!(lines[3], "# EOF");
    assert_eq!(parse(lines[2]), value);
});
