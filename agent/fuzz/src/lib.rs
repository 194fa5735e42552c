//! The agent's parsers of untrusted input, compiled on their own: the wire decoders, the
//! control request parser and label escaping depend on nothing else in the agent, so the fuzz
//! build need not instrument aya, tokio and the kernel objects (minutes) to fuzz them
//! (seconds).

#[path = "../../src/untrusted.rs"]
pub mod untrusted;

#[path = "../../src/wire/mod.rs"]
pub mod wire;

#[path = "../../src/control/protocol.rs"]
pub mod protocol;

#[path = "../../src/exporters/labels.rs"]
pub mod labels;
