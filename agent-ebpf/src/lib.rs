//! insite-agent kernel programs: one object per probe family (`src/bin/*`), so that each
//! family loads, attaches and fails on its own. This library holds what they share.
//!
//! It is also what `agent` names as a build-dependency, so cargo rebuilds the agent (whose
//! build.rs compiles the kernel objects) when this crate changes.
#![no_std]

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Every panic path is rejected by the verifier, so this is never reached.
    loop {}
}

/// Declares the object's license (GPL: required for the tracing helpers we call).
#[macro_export]
macro_rules! license {
    () => {
        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 4] = *b"GPL\0";
    };
}
