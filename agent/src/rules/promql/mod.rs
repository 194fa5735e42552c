//! CONTRACT STUB (the helper replaces the bodies; keep the signatures).
use std::{collections::BTreeMap, sync::Arc, time::Duration};

use super::tsdb::Tsdb;

/// What a set of expressions reads: metric name -> the longest lookback (range + offset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs(pub BTreeMap<String, Duration>);

impl Needs {
    pub fn merge(&mut self, _other: &Needs) {
        todo!()
    }
}

/// A sorted label set, cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Labels(pub Arc<[(Arc<str>, Arc<str>)]>);

impl Labels {
    pub fn get(&self, _name: &str) -> Option<&str> {
        todo!()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
    pub fn without_name(&self) -> Labels {
        todo!()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub labels: Labels,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(f64),
    Vector(Vec<Sample>),
}

/// Why an expression is not in the subset, naming the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// A parsed expression, checked against the subset.
#[derive(Debug, Clone)]
pub struct Expr {}

impl Expr {
    pub fn compile(_src: &str) -> Result<Expr, Refused> {
        todo!()
    }
    pub fn needs(&self) -> Needs {
        todo!()
    }
    /// Evaluates at `at_ms` (unix ms). Evaluation cannot fail once compiled: what has no data
    /// gives an empty vector.
    pub fn eval(&self, _db: &Tsdb, _at_ms: i64) -> Value {
        todo!()
    }
}
