# caddy-waproxy tasks. Install just with `npm install -g rust-just` (or
# `cargo install just`); every recipe is plain Go underneath.
# Versions come from xcaddy.json (read by ./internal/buildrecipe), never from here.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Build ./caddy with xcaddy per xcaddy.json (Caddy + caddy-l4 + this module).
build:
    go tool xcaddy $(go run ./internal/buildrecipe)

# Build, then run the proxy on examples/Caddyfile (port 5222, admin on localhost:2019).
run: build
    "$(go run ./internal/buildrecipe -output)" run --config examples/Caddyfile

# Run the tests (real sockets, Caddy in-process).
test:
    go test ./...

# gofmt, go vet and staticcheck.
lint:
    #!/usr/bin/env bash
    set -euo pipefail
    unformatted=$(gofmt -l .)
    if [[ -n $unformatted ]]; then echo "gofmt -l: not formatted:"; echo "$unformatted"; exit 1; fi
    go vet ./...
    go run honnef.co/go/tools/cmd/staticcheck@v0.8.1 ./...

# Two tables, plain and TLS terminated, plus the SOCKS5 exit hop (needs
# microsocks) and idle memory at 1K/5K/9K connections; about 13 minutes on
# 2 cores; the report goes to docs/bench-latest.md. Flags go to the bench:
# `just bench -quick`.
# Build, then benchmark our proxy against HAProxy, stock caddy-l4, microsocks and direct.
bench *flags: build
    go run ./bench -caddy "$(go run ./internal/buildrecipe -output)" {{flags}}

# A change measured: this tree (build B, as `just build` makes it) against a
# git revision (build A; default HEAD, i.e. the uncommitted changes), both
# as the waproxy target, alternating in one run of 6 rounds of the chat,
# plain MB/s and idle memory (9,000 held, one process) figures, about 4
# minutes; the report, with B/A same-round ratios, goes to bench-ab.md.
# Flags go to the bench: `just ab 5990249 -figures chat -rounds 10`.
# Benchmark this tree against another revision of it, side by side.
ab rev="HEAD" *flags: build
    #!/usr/bin/env bash
    set -euo pipefail
    dir=$(mktemp -d)
    trap 'git worktree remove --force "$dir/src" >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
    git worktree add -q --detach "$dir/src" "{{rev}}"
    # the same recipe, this module taken from the worktree, the binary in $dir
    recipe=$(go run ./internal/buildrecipe)
    recipe=${recipe//caddy-waproxy@v0.0.0=./caddy-waproxy@v0.0.0=$dir/src}
    recipe=${recipe/--output .\/caddy/--output $dir/caddy-a}
    go tool xcaddy $recipe
    go run ./bench -caddy "$dir/caddy-a" -caddy-b "$(go run ./internal/buildrecipe -output)" \
        -targets waproxy,waproxy-b -figures chat,bulk,idle -scaling=false -rounds 6 -out bench-ab.md {{flags}}

# Flags go to go test: `just bench-go -benchtime 2s -count 5`. The dialer
# benchmarks against microsocks are skipped without it.
# Go benchmarks of the hot paths (matchers, relay, dialers): ns/op, B/op, allocs/op.
bench-go *flags:
    go test -run '^$' -bench . -benchmem {{flags}} ./modules/...

# Fuzz every FuzzXxx target for a short while each (e.g. `just fuzz 1m`).
fuzz time="10s":
    #!/usr/bin/env bash
    set -euo pipefail
    found=0
    while read -r file; do
        for target in $(grep -oE '^func Fuzz[A-Za-z0-9_]*' "$file" | cut -d' ' -f2); do
            found=1
            echo "== ./$(dirname "$file") $target ({{time}})"
            go test -run '^$' -fuzz "^${target}\$" -fuzztime "{{time}}" "./$(dirname "$file")"
        done
    done < <(grep -rlE --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*\(' . | sed 's|^\./||' | sort)
    if [[ $found == 0 ]]; then echo "no Fuzz targets found"; exit 1; fi
