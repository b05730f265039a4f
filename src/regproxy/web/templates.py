"""The page layout and the style sheet. Values are escaped by ``markup.render``."""

from __future__ import annotations

from typing import Final

PAGE: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · regproxy</title>
<link rel="stylesheet" href="/ui/style.css">
</head>
<body>
<header>
<nav>
<a class="brand" href="/ui/">regproxy</a>
<a href="/ui/">Repositories</a>
<a href="/ui/upstreams">Upstreams</a>
<span class="spacer"></span>
$account
</nav>
</header>
<main>
$crumbs
<h1>$heading</h1>
$body
</main>
</body>
</html>
"""

SIGNED_IN: Final = """<span class="user">$user</span>
<form method="post" action="/ui/logout" class="inline">
<button type="submit">Log out</button></form>"""

LOGIN_FORM: Final = """<form method="post" action="/ui/login" class="login">
$message
<input type="hidden" name="next" value="$next">
<label>User name <input name="username" autocomplete="username" required autofocus></label>
<label>Password
<input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button>
</form>"""

STYLE: Final = """
:root {
  --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --soft: #f6f8fa; --accent: #0969da;
  --head: #24292f; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", sans-serif;
  font-size: 15px; color: var(--fg); background: #fff;
}
body { margin: 0; }
header { background: var(--head); }
nav { display: flex; align-items: center; gap: 1.2rem; max-width: 1200px; margin: 0 auto;
  padding: .7rem 1.5rem; }
nav a { color: #e6edf3; text-decoration: none; }
nav a:hover { color: #fff; text-decoration: underline; }
nav .brand { font-weight: 700; font-size: 1.1rem; color: #fff; margin-right: .8rem; }
nav .spacer { flex: 1; }
nav .user { color: #e6edf3; }
main { max-width: 1200px; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
h1 { font-size: 1.5rem; margin: .4rem 0 1rem; word-break: break-all; }
h2 { font-size: 1.15rem; margin: 1.8rem 0 .6rem; }
a { color: var(--accent); }
.crumbs { color: var(--muted); font-size: .9rem; margin-top: .4rem; word-break: break-all; }
.crumbs a { text-decoration: none; }
table { border-collapse: collapse; width: 100%; margin: .3rem 0 1rem; }
th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: var(--soft); font-weight: 600; font-size: .85rem; color: var(--muted);
  text-transform: uppercase; letter-spacing: .03em; }
tbody tr:hover { background: #f3f6fa; }
td.num, th.num { text-align: right; white-space: nowrap; }
code, .digest { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
  font-size: .85rem; }
.digest { color: var(--muted); }
.badge { display: inline-block; padding: .05rem .45rem; border-radius: 1rem; font-size: .78rem;
  border: 1px solid var(--line); background: var(--soft); color: var(--muted);
  white-space: nowrap; margin: .1rem .15rem .1rem 0; }
.badge.index { border-color: #b6e3ff; background: #ddf4ff; color: #0550ae; }
.badge.image { border-color: #aceebb; background: #dafbe1; color: #116329; }
.badge.artifact { border-color: #f5e0a8; background: #fff8c5; color: var(--warn); }
.badge.platform { border-color: #d8b9ff; background: #fbefff; color: #6639ba; }
.badge.missing { border-color: #ffcecb; background: #ffebe9; color: var(--bad); }
.note { color: var(--muted); font-size: .88rem; }
.pager { display: flex; gap: 1rem; margin: .5rem 0 1.5rem; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .35rem 1.2rem;
  margin: 0 0 1rem; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; word-break: break-all; }
details { margin: 1rem 0; }
summary { cursor: pointer; color: var(--accent); }
pre { background: var(--soft); border: 1px solid var(--line); border-radius: 6px;
  padding: .8rem; overflow: auto; font-size: .82rem; max-height: 32rem; }
form.inline { display: inline; margin: 0; }
nav button { background: transparent; color: #e6edf3; border: 1px solid #57606a;
  border-radius: 6px; padding: .2rem .6rem; cursor: pointer; font: inherit; }
form.login { display: grid; gap: .8rem; max-width: 22rem; padding: 1.4rem;
  border: 1px solid var(--line); border-radius: 8px; background: var(--soft); }
form.login label { display: grid; gap: .25rem; font-weight: 600; }
form.login input { font: inherit; padding: .45rem .55rem; border: 1px solid var(--line);
  border-radius: 6px; }
form.login button { font: inherit; padding: .5rem; border: 0; border-radius: 6px;
  background: var(--ok); color: #fff; font-weight: 600; cursor: pointer; }
.error { color: var(--bad); font-weight: 600; margin: 0; }
.empty { color: var(--muted); font-style: italic; }
progress { width: 8rem; }
"""
