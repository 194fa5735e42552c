//! Label values of exported series. Many of them come from processes on the host (process and
//! service names, destinations, unix socket paths, query operations), so the one label value
//! type of the exporter escapes what it holds whenever it is encoded: a value cannot end its
//! quoted string, add a line, or make the scrape unparseable (see `untrusted`).

use std::{borrow::Cow, sync::Arc};

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};

use crate::untrusted::write_label_value;

/// Any text, escaped for the exposition formats when it is written. Shared names (interned
/// by the collectors) are held, not copied.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LabelValue {
    Static(&'static str),
    Owned(String),
    Shared(Arc<str>),
}

impl LabelValue {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Static(s) => s,
            Self::Owned(s) => s,
            Self::Shared(s) => s,
        }
    }
}

impl From<&'static str> for LabelValue {
    fn from(s: &'static str) -> Self {
        Self::Static(s)
    }
}

impl From<String> for LabelValue {
    fn from(s: String) -> Self {
        Self::Owned(s)
    }
}

impl From<&Arc<str>> for LabelValue {
    fn from(s: &Arc<str>) -> Self {
        Self::Shared(s.clone())
    }
}

impl EncodeLabelValue for LabelValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        write_label_value(encoder, self.as_str())
    }
}

/// The labels of one sample: names (static, or an alert rule's own), escaped values.
pub type Labels = Vec<(Cow<'static, str>, LabelValue)>;

/// One label.
pub fn l(k: &'static str, v: impl Into<LabelValue>) -> Labels {
    vec![(Cow::Borrowed(k), v.into())]
}

/// One label whose name is not known at build time (an alert's); the caller checks the name
/// (`rules::template::is_label_name`).
pub fn named(k: &str, v: impl Into<LabelValue>) -> Labels {
    vec![(Cow::Owned(k.to_string()), v.into())]
}
