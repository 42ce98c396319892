#!/usr/bin/env bash
# Makes the toolchain pinned in rust-toolchain.toml (1.95.0) resolvable by
# rustup. Machines that carry Rust 1.95.0 as "stable" (and cannot download
# toolchains) get it linked under its version name. Sourced by test.sh and
# run-local.sh; idempotent.
ferry_pinned_toolchain() {
    local want
    want=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$(dirname "${BASH_SOURCE[0]}")/../rust-toolchain.toml")
    command -v rustup >/dev/null || return 0
    # Outside the repository, so rustup does not apply the pin to its own check.
    if (cd / && rustup run "$want" rustc --version >/dev/null 2>&1); then
        return 0
    fi
    local sysroot
    sysroot=$(cd / && rustc --print sysroot)
    if (cd / && rustc --version) | grep -q "^rustc $want "; then
        echo "[toolchain] linking the installed rustc $want as toolchain $want"
        (cd / && rustup toolchain link "$want" "$sysroot")
    else
        echo "[toolchain] Rust $want is pinned in rust-toolchain.toml; installing it with rustup"
        (cd / && rustup toolchain install "$want" --profile minimal --component rustfmt,clippy)
    fi
}
ferry_pinned_toolchain
