//! One module per command family. Each turns parsed arguments into
//! AdminService requests and prints the answers through `output`; each owns
//! the JSON shape of the messages it is about (`server_json`, `watch_json`,
//! ...) so that list and show print the same objects.

pub(crate) mod agents;
pub(crate) mod files;
pub(crate) mod servers;
pub(crate) mod status;
pub(crate) mod watches;
