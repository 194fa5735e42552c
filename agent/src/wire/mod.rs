//! What travels on database and cache connections, decoded in userspace from the bounded
//! prefixes the kernel hands over (issue 4's collectors build on these). Every function here
//! takes untrusted bytes: none may panic, whatever they are.

pub mod resp;
pub mod sql;
