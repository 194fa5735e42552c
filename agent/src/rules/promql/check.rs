//! The subset: the parser's AST turned into the evaluator's tree, refusing what is outside.
use std::{sync::Arc, time::Duration};

use promql_parser::{
    label::{MatchOp, Matcher},
    parser::{self, token, Expr as Ast, LabelModifier, Offset, VectorMatchCardinality},
    util::display_duration,
};

use super::{Labels, Needs, Refused};
use crate::rules::tsdb::Bounds;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RangeFn {
    Rate,
    Irate,
    Increase,
    Delta,
    Deriv,
    PredictLinear,
    AvgOverTime,
    MinOverTime,
    MaxOverTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MathFn {
    Abs,
    ClampMin,
    ClampMax,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AggOp {
    Sum,
    Avg,
    Min,
    Max,
    Count,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Pow,
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
}

impl BinOp {
    pub(super) fn is_comparison(self) -> bool {
        matches!(
            self,
            BinOp::Eq | BinOp::Ne | BinOp::Gt | BinOp::Lt | BinOp::Ge | BinOp::Le
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SetOp {
    And,
    Or,
    Unless,
}

/// Which labels identify a match between two vectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Matching {
    On(Vec<Arc<str>>),
    /// The default is `ignoring()`; `__name__` is always ignored then.
    Ignoring(Vec<Arc<str>>),
}

/// Which labels an aggregation keeps (`by ()` when none is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Grouping {
    By(Vec<Arc<str>>),
    Without(Vec<Arc<str>>),
}

#[derive(Debug, Clone)]
pub(super) struct Selector {
    pub metric: Arc<str>,
    /// Matchers on labels other than `__name__`.
    pub matchers: Vec<Matcher>,
    pub offset_ms: i64,
}

/// A subexpression's identity for the evaluation cache: its text, hashed once when compiled
/// (the texts spell out whole subtrees; hashing them at every look-up read them all, every
/// tick).
#[derive(Clone)]
pub(super) struct Key {
    hash: u64,
    text: Arc<str>,
}

impl Key {
    fn new(text: String) -> Self {
        use std::hash::BuildHasher as _;
        let hash = foldhash::fast::FixedState::with_seed(0x6b65_7973).hash_one(text.as_str());
        Self {
            hash,
            text: text.into(),
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.text.fmt(f)
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && (Arc::ptr_eq(&self.text, &other.text) || self.text == other.text)
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

#[derive(Debug, Clone)]
pub(super) enum Node {
    Number(f64),
    Time,
    Instant(Selector),
    Range {
        func: RangeFn,
        /// Identifies the function over the selection, for sharing results across rules.
        key: Key,
        sel: Selector,
        range_ms: i64,
        /// `predict_linear`'s horizon.
        arg: Option<Box<Node>>,
    },
    Quantile {
        q: Box<Node>,
        expr: Box<Node>,
    },
    Math {
        func: MathFn,
        expr: Box<Node>,
        arg: Option<Box<Node>>,
    },
    Absent {
        expr: Box<Node>,
        labels: Labels,
    },
    Vector(Box<Node>),
    Scalar(Box<Node>),
    Aggregate {
        op: AggOp,
        grouping: Grouping,
        expr: Box<Node>,
    },
    Neg(Box<Node>),
    Binary {
        op: BinOp,
        lhs: Box<Node>,
        rhs: Box<Node>,
        return_bool: bool,
        matching: Matching,
    },
    Set {
        op: SetOp,
        lhs: Box<Node>,
        rhs: Box<Node>,
        matching: Matching,
    },
    /// A vector subexpression whose result the rules of one tick share through the cache,
    /// `key` spelling it out (its tree as the checker built it).
    Shared {
        key: Key,
        expr: Box<Node>,
    },
}

impl Node {
    pub(super) fn is_scalar(&self) -> bool {
        match self {
            Node::Number(_) | Node::Time | Node::Scalar(_) => true,
            Node::Neg(e) => e.is_scalar(),
            Node::Binary { lhs, rhs, .. } => lhs.is_scalar() && rhs.is_scalar(),
            _ => false,
        }
    }

    pub(super) fn needs(&self, needs: &mut Needs) {
        let ms = |v: i64| Duration::from_millis(u64::try_from(v).unwrap_or(0));
        match self {
            Node::Number(_) | Node::Time => {}
            Node::Instant(sel) => needs.add(&sel.metric, ms(sel.offset_ms)),
            Node::Range {
                sel, range_ms, arg, ..
            } => {
                needs.add(&sel.metric, ms(sel.offset_ms.saturating_add(*range_ms)));
                if let Some(a) = arg {
                    a.needs(needs);
                }
            }
            Node::Quantile { q, expr } => {
                q.needs(needs);
                expr.needs(needs);
            }
            Node::Math { expr, arg, .. } => {
                expr.needs(needs);
                if let Some(a) = arg {
                    a.needs(needs);
                }
            }
            Node::Absent { expr, .. }
            | Node::Vector(expr)
            | Node::Scalar(expr)
            | Node::Aggregate { expr, .. }
            | Node::Neg(expr)
            | Node::Shared { expr, .. } => expr.needs(needs),
            Node::Binary { lhs, rhs, .. } | Node::Set { lhs, rhs, .. } => {
                lhs.needs(needs);
                rhs.needs(needs);
            }
        }
    }
}

fn refuse<T>(msg: impl Into<String>) -> Result<T, Refused> {
    Err(Refused(msg.into()))
}

fn millis(d: &Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(super) fn compile(src: &str, bounds: &Bounds) -> Result<Node, Refused> {
    let ast = parser::parse(src).map_err(|e| Refused(format!("does not parse: {e}")))?;
    let node = Checker { bounds }.node(&ast)?;
    Ok(share(node))
}

/// Marks the vector subexpressions above the selectors as shared: rules often repeat one
/// (a warning and a critical rule differ only in the threshold, several quantiles read one
/// histogram's rates, one expression serves rules of several severities), and a repeat then
/// costs a look-up. Range functions have their own key; scalars are too cheap to share.
fn share(node: Node) -> Node {
    let worth = !node.is_scalar()
        && matches!(
            node,
            Node::Instant(_)
                | Node::Quantile { .. }
                | Node::Math { .. }
                | Node::Absent { .. }
                | Node::Aggregate { .. }
                | Node::Neg(_)
                | Node::Binary { .. }
                | Node::Set { .. }
        );
    // The tree's Debug form names every operand, modifier and literal (floats exactly), so
    // equal keys mean equal expressions.
    let key: Option<Key> = worth.then(|| Key::new(format!("{node:?}")));
    let sub = |b: Box<Node>| Box::new(share(*b));
    let node = match node {
        Node::Range {
            func,
            key,
            sel,
            range_ms,
            arg,
        } => Node::Range {
            func,
            key,
            sel,
            range_ms,
            arg: arg.map(sub),
        },
        Node::Quantile { q, expr } => Node::Quantile {
            q: sub(q),
            expr: sub(expr),
        },
        Node::Math { func, expr, arg } => Node::Math {
            func,
            expr: sub(expr),
            arg: arg.map(sub),
        },
        Node::Absent { expr, labels } => Node::Absent {
            expr: sub(expr),
            labels,
        },
        Node::Vector(e) => Node::Vector(sub(e)),
        Node::Scalar(e) => Node::Scalar(sub(e)),
        Node::Aggregate { op, grouping, expr } => Node::Aggregate {
            op,
            grouping,
            expr: sub(expr),
        },
        Node::Neg(e) => Node::Neg(sub(e)),
        Node::Binary {
            op,
            lhs,
            rhs,
            return_bool,
            matching,
        } => Node::Binary {
            op,
            lhs: sub(lhs),
            rhs: sub(rhs),
            return_bool,
            matching,
        },
        Node::Set {
            op,
            lhs,
            rhs,
            matching,
        } => Node::Set {
            op,
            lhs: sub(lhs),
            rhs: sub(rhs),
            matching,
        },
        leaf @ (Node::Number(_) | Node::Time | Node::Instant(_) | Node::Shared { .. }) => leaf,
    };
    match key {
        Some(key) => Node::Shared {
            key,
            expr: Box::new(node),
        },
        None => node,
    }
}

struct Checker<'a> {
    bounds: &'a Bounds,
}

impl Checker<'_> {
    fn node(&self, ast: &Ast) -> Result<Node, Refused> {
        match ast {
            Ast::NumberLiteral(n) => Ok(Node::Number(n.val)),
            Ast::Paren(p) => self.node(&p.expr),
            Ast::Unary(u) => Ok(Node::Neg(Box::new(self.node(&u.expr)?))),
            Ast::VectorSelector(vs) => Ok(Node::Instant(self.selector(vs, None)?)),
            Ast::MatrixSelector(_) => refuse(
                "a range selector is only allowed as the argument of a range function \
                 (an expression must give an instant vector or a scalar)",
            ),
            Ast::StringLiteral(_) => refuse("string literals are not in the agent's PromQL subset"),
            Ast::Subquery(_) => {
                refuse("subqueries are not supported (the window keeps samples, not past results)")
            }
            Ast::Extension(_) => refuse("extension expressions are not supported"),
            Ast::Aggregate(a) => self.aggregate(a),
            Ast::Binary(b) => self.binary(b),
            Ast::Call(c) => self.call(c),
        }
    }

    fn aggregate(&self, a: &parser::AggregateExpr) -> Result<Node, Refused> {
        let op = match a.op.id() {
            token::T_SUM => AggOp::Sum,
            token::T_AVG => AggOp::Avg,
            token::T_MIN => AggOp::Min,
            token::T_MAX => AggOp::Max,
            token::T_COUNT => AggOp::Count,
            _ => {
                return refuse(format!(
                    "aggregation `{}` is not in the agent's PromQL subset (sum, avg, min, max, \
                     count)",
                    a.op
                ))
            }
        };
        let grouping = match &a.modifier {
            None => Grouping::By(Vec::new()),
            Some(LabelModifier::Include(l)) => Grouping::By(names(&l.labels)),
            Some(LabelModifier::Exclude(l)) => Grouping::Without(names(&l.labels)),
        };
        let expr = Box::new(self.vector(&a.expr, "aggregation")?);
        Ok(Node::Aggregate { op, grouping, expr })
    }

    fn binary(&self, b: &parser::BinaryExpr) -> Result<Node, Refused> {
        let set = match b.op.id() {
            token::T_LAND => Some(SetOp::And),
            token::T_LOR => Some(SetOp::Or),
            token::T_LUNLESS => Some(SetOp::Unless),
            _ => None,
        };
        let op = match b.op.id() {
            token::T_ADD => BinOp::Add,
            token::T_SUB => BinOp::Sub,
            token::T_MUL => BinOp::Mul,
            token::T_DIV => BinOp::Div,
            token::T_MOD => BinOp::Mod,
            token::T_POW => BinOp::Pow,
            token::T_EQLC => BinOp::Eq,
            token::T_NEQ => BinOp::Ne,
            token::T_GTR => BinOp::Gt,
            token::T_LSS => BinOp::Lt,
            token::T_GTE => BinOp::Ge,
            token::T_LTE => BinOp::Le,
            _ if set.is_some() => BinOp::Add,
            _ => {
                return refuse(format!(
                    "operator `{}` is not in the agent's PromQL subset",
                    b.op
                ))
            }
        };
        let mut matching = Matching::Ignoring(Vec::new());
        let mut return_bool = false;
        if let Some(m) = &b.modifier {
            match &m.card {
                VectorMatchCardinality::ManyToOne(_) => {
                    return refuse("`group_left` (many-to-one matching) is not supported")
                }
                VectorMatchCardinality::OneToMany(_) => {
                    return refuse("`group_right` (one-to-many matching) is not supported")
                }
                _ => {}
            }
            if m.fill_values.lhs.is_some() || m.fill_values.rhs.is_some() {
                return refuse("`fill` modifiers are not supported");
            }
            matching = match &m.matching {
                None => Matching::Ignoring(Vec::new()),
                Some(LabelModifier::Include(l)) => Matching::On(names(&l.labels)),
                Some(LabelModifier::Exclude(l)) => Matching::Ignoring(names(&l.labels)),
            };
            return_bool = m.return_bool;
        }
        let lhs = Box::new(self.node(&b.lhs)?);
        let rhs = Box::new(self.node(&b.rhs)?);
        match set {
            Some(op) => Ok(Node::Set {
                op,
                lhs,
                rhs,
                matching,
            }),
            None => Ok(Node::Binary {
                op,
                lhs,
                rhs,
                return_bool,
                matching,
            }),
        }
    }

    fn call(&self, c: &parser::Call) -> Result<Node, Refused> {
        let name = c.func.name;
        let args: Vec<&Ast> = c.args.args.iter().map(|a| &**a).collect();
        let arg = |i: usize| -> Result<&Ast, Refused> {
            args.get(i)
                .copied()
                .ok_or_else(|| Refused(format!("`{name}` lacks argument {}", i + 1)))
        };
        let range_fn = match name {
            "rate" => Some(RangeFn::Rate),
            "irate" => Some(RangeFn::Irate),
            "increase" => Some(RangeFn::Increase),
            "delta" => Some(RangeFn::Delta),
            "deriv" => Some(RangeFn::Deriv),
            "predict_linear" => Some(RangeFn::PredictLinear),
            "avg_over_time" => Some(RangeFn::AvgOverTime),
            "min_over_time" => Some(RangeFn::MinOverTime),
            "max_over_time" => Some(RangeFn::MaxOverTime),
            _ => None,
        };
        if let Some(func) = range_fn {
            let Ast::MatrixSelector(ms) = arg(0)? else {
                return refuse(format!(
                    "`{name}` must be applied to a range selector (subqueries are not supported)"
                ));
            };
            let range_ms = millis(&ms.range);
            let sel = self.selector(&ms.vs, Some(range_ms))?;
            let arg = match func {
                RangeFn::PredictLinear => Some(Box::new(self.scalar(arg(1)?, name)?)),
                _ => None,
            };
            let matchers: Vec<String> = sel.matchers.iter().map(|m| m.to_string()).collect();
            let key = format!(
                "{func:?}({}{{{}}}[{range_ms}] offset {})",
                sel.metric,
                matchers.join(","),
                sel.offset_ms
            );
            return Ok(Node::Range {
                func,
                key: Key::new(key),
                sel,
                range_ms,
                arg,
            });
        }
        match name {
            "histogram_quantile" => Ok(Node::Quantile {
                q: Box::new(self.scalar(arg(0)?, name)?),
                expr: Box::new(self.vector(arg(1)?, name)?),
            }),
            "abs" | "clamp_min" | "clamp_max" => {
                let func = match name {
                    "abs" => MathFn::Abs,
                    "clamp_min" => MathFn::ClampMin,
                    _ => MathFn::ClampMax,
                };
                let expr = Box::new(self.vector(arg(0)?, name)?);
                let arg = match func {
                    MathFn::Abs => None,
                    _ => Some(Box::new(self.scalar(arg(1)?, name)?)),
                };
                Ok(Node::Math { func, expr, arg })
            }
            "absent" => {
                let expr = self.vector(arg(0)?, name)?;
                let labels = match &expr {
                    Node::Instant(sel) => absent_labels(&sel.matchers),
                    _ => Labels::default(),
                };
                Ok(Node::Absent {
                    expr: Box::new(expr),
                    labels,
                })
            }
            "vector" => Ok(Node::Vector(Box::new(self.scalar(arg(0)?, name)?))),
            "scalar" => Ok(Node::Scalar(Box::new(self.vector(arg(0)?, name)?))),
            "time" => Ok(Node::Time),
            _ => refuse(format!(
                "function `{name}` is not in the agent's PromQL subset"
            )),
        }
    }

    fn scalar(&self, ast: &Ast, ctx: &str) -> Result<Node, Refused> {
        let n = self.node(ast)?;
        if !n.is_scalar() {
            return refuse(format!(
                "`{ctx}` expects a scalar there, not an instant vector"
            ));
        }
        Ok(n)
    }

    fn vector(&self, ast: &Ast, ctx: &str) -> Result<Node, Refused> {
        let n = self.node(ast)?;
        if n.is_scalar() {
            return refuse(format!(
                "`{ctx}` expects an instant vector there, not a scalar"
            ));
        }
        Ok(n)
    }

    fn selector(
        &self,
        vs: &parser::VectorSelector,
        range_ms: Option<i64>,
    ) -> Result<Selector, Refused> {
        if vs.at.is_some() {
            return refuse("`@` modifier is not supported (the window only holds recent samples)");
        }
        if !vs.matchers.or_matchers.is_empty() {
            return refuse("`or` inside a selector's braces is not supported");
        }
        let mut metric = vs.name.clone();
        let mut matchers = Vec::new();
        for m in &vs.matchers.matchers {
            if m.name != "__name__" {
                matchers.push(m.clone());
                continue;
            }
            match (&m.op, &metric) {
                (MatchOp::Equal, None) => metric = Some(m.value.clone()),
                _ => {
                    return refuse(format!(
                        "selecting metrics by `__name__{}` is not supported: a selector must \
                         name its metric, as the window keeps only the metrics rules name",
                        m.op
                    ))
                }
            }
        }
        let Some(metric) = metric else {
            return refuse(
                "a selector without a metric name is not supported: the window keeps only the \
                 metrics rules name",
            );
        };
        let offset_ms = match &vs.offset {
            None => 0,
            Some(Offset::Pos(d)) => millis(d),
            Some(Offset::Neg(d)) => {
                return refuse(format!(
                    "negative offset -{} is not supported (it reads ahead of the evaluation)",
                    display_duration(d)
                ))
            }
        };
        let span = &self.bounds.coarse_span;
        if let Some(range_ms) = range_ms {
            let step = &self.bounds.step;
            if range_ms < millis(step) {
                return refuse(format!(
                    "range {} is shorter than the tick ({})",
                    show(range_ms),
                    display_duration(step)
                ));
            }
            if range_ms.saturating_add(offset_ms) > millis(span) {
                let what = if offset_ms > 0 {
                    format!("range {} with offset {}", show(range_ms), show(offset_ms))
                } else {
                    format!("range {}", show(range_ms))
                };
                return refuse(format!(
                    "{what} is longer than the window ({})",
                    display_duration(span)
                ));
            }
        } else if offset_ms > millis(span) {
            return refuse(format!(
                "offset {} is longer than the window ({})",
                show(offset_ms),
                display_duration(span)
            ));
        }
        Ok(Selector {
            metric: metric.into(),
            matchers,
            offset_ms,
        })
    }
}

fn show(ms: i64) -> String {
    display_duration(&Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

fn names(labels: &[String]) -> Vec<Arc<str>> {
    let mut v: Vec<Arc<str>> = labels.iter().map(|l| Arc::from(l.as_str())).collect();
    v.sort();
    v.dedup();
    v
}

/// The labels `absent` gives: those set by an equality matcher, unless another matcher also
/// names the label (as Prometheus does).
fn absent_labels(matchers: &[Matcher]) -> Labels {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for m in matchers {
        let have = pairs.iter().position(|(n, _)| *n == m.name);
        match (&m.op, have) {
            (MatchOp::Equal, None) if !m.value.is_empty() => pairs.push((&m.name, &m.value)),
            (_, Some(i)) => {
                pairs.remove(i);
            }
            _ => {}
        }
    }
    Labels::from_pairs(pairs)
}
