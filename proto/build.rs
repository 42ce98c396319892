//! Compiles `proto/ferry/v1/*.proto` with protox (no system `protoc`) and
//! writes the file descriptor set used by gRPC reflection.
use std::{env, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "ferry/v1/types.proto",
        "ferry/v1/admin.proto",
        "ferry/v1/agent.proto",
    ];
    println!("cargo:rerun-if-changed=ferry");
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(out.join("ferry_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // `AgentService.Connect` would clash with the generated `connect` constructor.
        .build_transport(false)
        // Messages holding a secret get a redacting `Debug` by hand (`src/redact.rs`);
        // every message embedding them derives its `Debug` from theirs.
        .skip_debug([
            ".ferry.v1.Password",
            ".ferry.v1.PrivateKey",
            ".ferry.v1.UpdateServerRequest",
        ])
        .compile_fds(fds)?;
    Ok(())
}
