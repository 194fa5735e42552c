//! The agent's wire decoders, compiled on their own: they depend on nothing else in the agent,
//! so the fuzz build need not instrument aya, tokio and the kernel objects (minutes) to fuzz
//! them (seconds).

#[path = "../../src/wire/mod.rs"]
pub mod wire;
