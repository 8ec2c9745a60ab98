/**
 * The technician's page: an HTML document, its stylesheet and its script, all held as
 * strings inside the executable (no CDN, no external asset; works with no network beyond
 * the device). Served as `/`, `/page.css` and `/page.js` under a CSP that allows only this
 * origin and no inline script or style (agent/api.ts PAGE_CSP).
 *
 * Safety: the script never uses innerHTML; every value from the API (app names, log
 * lines, event data) reaches the DOM through textContent or setAttribute, so it is
 * always text, never markup.
 *
 * Live log: the script reads the server-sent-event stream with fetch() and a stream
 * reader instead of EventSource, because EventSource cannot send an Authorization header
 * and a token in the URL would end up in history, proxy and access logs. On loopback
 * reads are open and the header is simply absent.
 */

export const PAGE_HTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>fleetlet device</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/page.css">
<script src="/page.js" defer></script>
</head><body>
<header class="card">
  <div class="top"><h1 id="device">fleetlet</h1><span id="conn" class="pill">connecting…</span></div>
  <dl id="ident" class="kv"></dl>
</header>
<div id="alerts" role="alert"></div>
<section class="card" aria-labelledby="h-uplink"><h2 id="h-uplink">Uplink</h2>
  <div class="row"><span id="uplink" class="pill">…</span><span id="outbox"></span><span id="oldest" class="dim"></span></div>
</section>
<section class="card" aria-labelledby="h-apps"><h2 id="h-apps">Apps</h2>
  <div id="apps" class="apps"><p class="dim">loading…</p></div>
  <div class="auth">
    <label for="token">Technician token</label>
    <div class="row"><input id="token" type="password" autocomplete="off" spellcheck="false" placeholder="needed to restart, stop, start"><button type="button" id="forget">Forget</button></div>
    <div id="msg" role="status" class="dim"></div>
  </div>
</section>
<section class="card" aria-labelledby="h-updates"><h2 id="h-updates">Updates</h2>
  <div id="upcur" class="meta"></div>
  <ol id="uphist" class="events"></ol>
  <div class="row upload"><label for="bundle" class="dim">Install a signed bundle (.bundle, verified on the device before anything changes)</label>
    <input id="bundle" type="file" accept=".bundle,application/octet-stream"><button type="button" id="upload" class="primary">Upload</button><span id="upmsg" role="status" class="dim"></span></div>
</section>
<section class="card" aria-labelledby="h-metrics"><h2 id="h-metrics">CPU and memory, last hour</h2>
  <div class="sparks">
    <figure><figcaption>CPU <b id="cpuNow">–</b> <span id="cpuRange" class="dim"></span></figcaption><svg id="cpu" viewBox="0 0 300 60" preserveAspectRatio="none" role="img" aria-label="CPU utilisation"></svg></figure>
    <figure><figcaption>Memory <b id="memNow">–</b> <span id="memRange" class="dim"></span></figcaption><svg id="mem" viewBox="0 0 300 60" preserveAspectRatio="none" role="img" aria-label="Memory in use"></svg></figure>
  </div>
</section>
<section class="card" aria-labelledby="h-log"><h2 id="h-log">Log</h2>
  <div class="row"><select id="logapp" aria-label="app"></select><span id="logstate" class="pill">–</span></div>
  <div id="log" class="log" tabindex="0"></div>
</section>
<section class="card" aria-labelledby="h-events"><h2 id="h-events">Recent events</h2>
  <ol id="events" class="events"></ol>
</section>
<footer class="dim">fleetlet agent · local page · <span id="updated"></span></footer>
</body></html>`;

export const PAGE_CSS = String.raw`
:root{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1b1f24;background:#f2f4f7;font-size:15px}
*{box-sizing:border-box}
[hidden]{display:none!important}
body{margin:0 auto;padding:10px;max-width:980px}
h1{font-size:1.15rem;margin:0;word-break:break-all}
h2{font-size:1rem;margin:0 0 .5rem}
.card{background:#fff;border-radius:10px;padding:10px 12px;box-shadow:0 1px 2px #0002;margin-bottom:10px}
.top{display:flex;justify-content:space-between;align-items:center;gap:8px}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:center}
.dim{color:#5b6470;font-size:.85rem}
.pill{display:inline-block;padding:2px 9px;border-radius:10px;font-size:.8rem;background:#e3e6ea;white-space:nowrap}
.ok{background:#c9f2d0;color:#0b4d1a}.bad{background:#ffd1d1;color:#7a0b0b}.warn{background:#ffeab0;color:#5c4300}
.kv{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:2px 12px;margin:.5rem 0 0}
.kv div{min-width:0}.kv dt{font-size:.72rem;color:#5b6470;margin:0}.kv dd{margin:0;overflow-wrap:anywhere}
#alerts .banner{background:#b91c1c;color:#fff;border-radius:10px;padding:10px 12px;margin-bottom:10px;font-weight:600}
.apps{display:grid;grid-template-columns:repeat(auto-fill,minmax(280px,1fr));gap:8px}
.app{border:1px solid #dde1e6;border-radius:8px;padding:8px 10px;min-width:0}
.app.crash{border:2px solid #b91c1c;background:#fff5f5}
.app .head{display:flex;flex-wrap:wrap;gap:6px;align-items:center}
.app .name{font-weight:600;margin-right:auto;overflow-wrap:anywhere}
.app .meta{font-size:.85rem;color:#3b424b;margin:.35rem 0;overflow-wrap:anywhere}
.app .meta.error{color:#7a0b0b}
.app .actions{display:flex;gap:6px;flex-wrap:wrap}
button{font:inherit;min-height:38px;padding:4px 14px;border-radius:8px;border:1px solid #8a929c;background:#fff;color:inherit}
button.primary{background:#1d4ed8;border-color:#1d4ed8;color:#fff}
button:disabled{opacity:.5}
input,select{font:inherit;min-height:38px;padding:4px 8px;border-radius:8px;border:1px solid #8a929c;background:#fff;max-width:100%}
#token{flex:1 1 200px;min-width:0}
.auth{margin-top:10px}.auth label{display:block;font-size:.85rem;margin-bottom:3px}
.sparks{display:grid;grid-template-columns:repeat(auto-fit,minmax(240px,1fr));gap:10px}
figure{margin:0}figcaption{font-size:.9rem;margin-bottom:3px}
svg{display:block;width:100%;height:64px;background:#f7f8fa;border-radius:6px}
.band{fill:#93c5fd;opacity:.45}.avg{fill:none;stroke:#1d4ed8;stroke-width:1.5;vector-effect:non-scaling-stroke}
.log{background:#111418;color:#d7dde4;padding:8px;border-radius:8px;height:40vh;min-height:160px;overflow:auto;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;overflow-wrap:anywhere;margin-top:6px}
.log .err{color:#ff9b9b}.log .sys{color:#8fb3ff;font-style:italic}
.events{list-style:none;margin:0;padding:0;font-size:.85rem}
.events li{display:flex;flex-wrap:wrap;gap:6px;padding:4px 0;border-bottom:1px solid #eef0f3;align-items:baseline}
.events time{color:#5b6470;font-variant-numeric:tabular-nums}
.events .type{font-weight:600}.events .data{overflow-wrap:anywhere;color:#3b424b}
footer{text-align:center;padding:6px}
.upload{margin-top:8px}.upload label{flex:1 1 100%}
#bundle{flex:1 1 200px;min-width:0}
`;

export const PAGE_JS = String.raw`'use strict';
(function () {
  var $ = function (id) { return document.getElementById(id); };
  /** Build an element; text goes in as textContent, so nothing from the API is ever parsed as HTML. */
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  var SVG = 'http://www.w3.org/2000/svg';
  var tok = $('token');
  tok.value = sessionStorage.getItem('fleetlet-token') || '';
  tok.addEventListener('input', function () { sessionStorage.setItem('fleetlet-token', tok.value.trim()); });
  $('forget').addEventListener('click', function () { tok.value = ''; sessionStorage.removeItem('fleetlet-token'); });
  function auth() { var t = tok.value.trim(); return t ? { authorization: 'Bearer ' + t } : {}; }

  function ago(ms) {
    var s = Math.max(0, Math.round(ms / 1000));
    if (s < 90) return s + ' s';
    if (s < 5400) return Math.round(s / 60) + ' min';
    if (s < 172800) return Math.round(s / 3600) + ' h';
    return Math.round(s / 86400) + ' d';
  }
  function bytes(n) {
    if (typeof n !== 'number' || !isFinite(n)) return String(n);
    var u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'], i = 0;
    while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + ' ' + u[i];
  }
  function clock(t) { var d = new Date(t); return d.toLocaleTimeString([], { hour12: false }); }

  var msgTimer = 0;
  function say(text, kind) {
    var m = $('msg'); m.textContent = text; m.className = kind || 'dim';
    clearTimeout(msgTimer); msgTimer = setTimeout(function () { m.textContent = ''; }, 8000);
  }

  async function getJson(path) {
    var r = await fetch(path, { headers: auth(), cache: 'no-store' });
    var b = await r.json().catch(function () { return null; });
    if (!r.ok) { var e = new Error(b && b.error ? b.error.code + ': ' + b.error.message : 'HTTP ' + r.status); e.status = r.status; throw e; }
    return b;
  }

  // ---- device, uplink, apps
  function kv(dl, rows) {
    dl.replaceChildren();
    rows.forEach(function (r) {
      if (r[1] === undefined || r[1] === null || r[1] === '') return;
      var d = el('div'); d.append(el('dt', '', r[0]), el('dd', '', r[1])); dl.append(d);
    });
  }
  var cards = new Map();
  function stateClass(s) { return s === 'running' ? 'ok' : s === 'crash-loop' || s === 'exited' ? 'bad' : 'warn'; }
  function healthClass(h) { return h === 'healthy' ? 'ok' : h === 'unhealthy' ? 'bad' : h === 'starting' ? 'warn' : ''; }
  /** Limits as asked and as actually enforced (agent/limits.ts EnforcedLimits); only what was asked for. */
  function limitsText(l) {
    if (!l || typeof l !== 'object') return '';
    var out = [];
    if (l.memory && l.memory.requestedMb != null) out.push('memory ' + l.memory.requestedMb + ' MB: ' + (l.memory.enforced === 'none' ? 'NOT enforced' : l.memory.enforced));
    if (l.cpu && l.cpu.requestedPercent != null) out.push('cpu ' + l.cpu.requestedPercent + '%: ' + (l.cpu.enforced === 'none' ? 'NOT enforced' : l.cpu.enforced));
    if (l.nice != null) out.push('nice ' + l.nice);
    if (Array.isArray(l.notes) && l.notes.length) out.push(l.notes.join('; '));
    return out.join(' · ');
  }
  function card(name) {
    var c = cards.get(name);
    if (c) return c;
    var root = el('div', 'app'); root.setAttribute('data-app', name);
    var head = el('div', 'head');
    var n = el('span', 'name', name), st = el('span', 'pill state'), hl = el('span', 'pill health');
    head.append(n, st, hl);
    var meta = el('div', 'meta'), rs = el('b', 'restarts'), rest = el('span', 'rest');
    meta.append('restarts ', rs, rest);
    var lim = el('div', 'meta limits');
    var actions = el('div', 'actions');
    ['restart', 'stop', 'start'].forEach(function (a) {
      var b = el('button', a === 'restart' ? 'primary' : '', a[0].toUpperCase() + a.slice(1));
      b.type = 'button'; b.setAttribute('data-action', a); b.setAttribute('aria-label', a + ' ' + name);
      b.addEventListener('click', function () { act(name, a, b); });
      actions.append(b);
    });
    var err = el('div', 'meta error');
    root.append(head, meta, lim, err, actions);
    c = { root: root, st: st, hl: hl, rs: rs, rest: rest, lim: lim, err: err };
    cards.set(name, c);
    return c;
  }
  function renderApps(apps) {
    var box = $('apps'), seen = new Set(), alerts = $('alerts');
    alerts.replaceChildren();
    if (!apps.length) { box.replaceChildren(el('p', 'dim', 'no apps configured')); cards.clear(); return; }
    apps.forEach(function (a) {
      seen.add(a.name);
      var c = card(a.name);
      var looping = a.state === 'crash-loop' || a.crashLoop === true;
      c.root.classList.toggle('crash', looping);
      c.st.textContent = looping ? 'CRASH-LOOP' : a.state; c.st.className = 'pill state ' + (looping ? 'bad' : stateClass(a.state));
      var h = a.health && a.health.status;
      c.hl.hidden = !h || h === 'none';
      if (h) {
        c.hl.textContent = h + (a.health.failures ? ' (' + a.health.failures + ' failed)' : '');
        c.hl.className = 'pill health ' + healthClass(h);
        c.hl.title = a.health.lastError ? String(a.health.lastError) : '';
      }
      c.rs.textContent = String(a.restarts);
      var parts = [];
      if (a.pid) parts.push('pid ' + a.pid);
      if (a.state === 'running' && a.startedAt) parts.push('up ' + ago(Date.now() - a.startedAt));
      if (a.lastExit) parts.push('last exit ' + (a.lastExit.signal || 'code ' + a.lastExit.code) + ', ' + ago(Date.now() - a.lastExit.at) + ' ago');
      if (a.user) parts.push('user ' + a.user);
      if (a.logFile) parts.push('log ' + a.logFile);
      c.rest.textContent = parts.length ? ' · ' + parts.join(' · ') : '';
      var lt = limitsText(a.limits);
      c.lim.textContent = lt ? 'limits: ' + lt : ''; c.lim.hidden = !lt;
      c.err.textContent = a.startError ? 'cannot start: ' + a.startError : ''; c.err.hidden = !a.startError;
      if (looping) alerts.append(el('div', 'banner', '⚠ ' + a.name + ' is crash-looping (' + a.restarts + ' restarts' + (a.lastExit ? ', last exit ' + (a.lastExit.signal || 'code ' + a.lastExit.code) : '') + ')'));
      if (c.root.parentNode !== box) box.append(c.root);
    });
    cards.forEach(function (c, name) { if (!seen.has(name)) { c.root.remove(); cards.delete(name); } });
    Array.from(box.children).forEach(function (ch) { if (!ch.classList.contains('app')) ch.remove(); });
    var sel = $('logapp'), cur = sel.value;
    var names = apps.map(function (a) { return a.name; });
    if (Array.from(sel.options).map(function (o) { return o.value; }).join('\n') !== names.join('\n')) {
      sel.replaceChildren.apply(sel, names.map(function (n) { var o = el('option', '', n); o.value = n; return o; }));
      if (names.indexOf(cur) >= 0) sel.value = cur;
    }
    if (sel.value && sel.value !== logApp) follow(sel.value);
  }
  function renderStatus(s) {
    $('device').textContent = s.deviceId;
    var inv = s.inventory || {};
    kv($('ident'), [
      ['agent', s.version], ['node', s.node], ['hostname', inv.hostname], ['model', [inv.manufacturer, inv.model].filter(Boolean).join(' ')],
      ['os', inv.os], ['kernel', inv.kernel], ['arch', inv.arch], ['agent up', ago(s.uptimeS * 1000)],
      ['desired rev', s.desired && s.desired.rev],
    ]);
    var hub = s.hub || {}, ob = hub.outbox || {}, u = $('uplink');
    u.textContent = !hub.configured ? 'no hub configured' : hub.connected ? 'online' : 'offline';
    u.className = 'pill ' + (!hub.configured ? '' : hub.connected ? 'ok' : 'bad');
    $('outbox').textContent = 'outbox ' + (ob.depth === undefined ? '?' : ob.depth) + ' queued' + (ob.bytes ? ' (' + bytes(ob.bytes) + ')' : '');
    $('oldest').textContent = ob.depth ? 'oldest ' + ago(ob.oldestAgeMs) : '';
    renderApps(s.apps || []);
  }

  async function act(app, action, btn) {
    if (!tok.value.trim()) { say('Enter the technician token to ' + action + ' ' + app + '.', 'bad'); tok.focus(); return; }
    btn.disabled = true;
    try {
      var r = await fetch('/api/v1/apps/' + encodeURIComponent(app) + '/' + action, { method: 'POST', headers: auth() });
      var b = await r.json().catch(function () { return null; });
      if (r.ok) say(app + ': ' + action + ' done', 'ok');
      else say(app + ': ' + (b && b.error ? b.error.code + ' – ' + b.error.message : 'HTTP ' + r.status), 'bad');
    } catch (e) { say(app + ': ' + e.message, 'bad'); }
    btn.disabled = false;
    refresh();
  }

  // ---- sparklines: min..max band and average line over the last hour
  function spark(id, key, unit, pts, span, bucket) {
    var svg = $(id), W = 300, H = 60;
    // x axis: the data's own time range (at most the span), so a young agent's first minutes fill the width
    var t1 = pts.length ? pts[pts.length - 1].t + bucket : Date.now(), t0 = pts.length ? Math.max(pts[0].t, t1 - span) : t1 - span;
    if (t1 - t0 < bucket) t0 = t1 - bucket;
    var xs = function (t) { return Math.max(0, Math.min(W, ((t - t0) / (t1 - t0)) * W)); };
    var ys = function (v) { return H - (Math.min(100, Math.max(0, v)) / 100) * (H - 2) - 1; };
    // each bucket covers [t, t + bucket): draw it across its width
    var ok = [];
    pts.forEach(function (p) { if (p[key]) { ok.push({ t: p.t, v: p[key] }, { t: p.t + bucket, v: p[key] }); } });
    svg.replaceChildren();
    if (!ok.length) { $(key + 'Now').textContent = '–'; $(key + 'Range').textContent = ''; return; }
    var top = ok.map(function (p) { return xs(p.t).toFixed(1) + ',' + ys(p.v.max).toFixed(1); });
    var bot = ok.slice().reverse().map(function (p) { return xs(p.t).toFixed(1) + ',' + ys(p.v.min).toFixed(1); });
    var band = document.createElementNS(SVG, 'polygon'); band.setAttribute('class', 'band'); band.setAttribute('points', top.concat(bot).join(' '));
    var line = document.createElementNS(SVG, 'polyline'); line.setAttribute('class', 'avg');
    line.setAttribute('points', ok.map(function (p) { return xs(p.t).toFixed(1) + ',' + ys(p.v.avg).toFixed(1); }).join(' '));
    svg.append(band, line);
    var last = ok[ok.length - 1].v;
    var lo = Math.min.apply(null, ok.map(function (p) { return p.v.min; })), hi = Math.max.apply(null, ok.map(function (p) { return p.v.max; }));
    $(key + 'Now').textContent = last.avg.toFixed(1) + unit;
    $(key + 'Range').textContent = 'last ' + ago(t1 - t0) + ' · min ' + lo.toFixed(0) + unit + ' · max ' + hi.toFixed(0) + unit;
  }
  var havePoints = false;
  async function refreshHistory() {
    try {
      var h = await getJson('/api/v1/metrics/history');
      havePoints = h.points.length > 0;
      spark('cpu', 'cpu', '%', h.points, h.spanMs, h.bucketMs);
      spark('mem', 'mem', '%', h.points, h.spanMs, h.bucketMs);
    } catch (e) { /* shown by the status poll */ }
  }

  // ---- recent events (cursor-paged)
  var cursor = 0, shown = [];
  function eventText(d) {
    if (!d || typeof d !== 'object') return '';
    var t = Object.keys(d).filter(function (k) { return d[k] !== null && d[k] !== undefined; }).map(function (k) {
      var v = d[k];
      if (k === 'lastExit' && typeof v === 'object') return 'last exit ' + (v.signal || 'code ' + v.code);
      return k + '=' + (typeof v === 'object' ? JSON.stringify(v) : String(v));
    }).join(' ');
    return t.length > 160 ? t.slice(0, 159) + '…' : t;
  }
  async function refreshEvents() {
    var p = await getJson('/api/v1/events?since=' + cursor);
    if (p.truncated && cursor > 0) shown = [];
    cursor = p.next;
    shown = shown.concat(p.events).slice(-30);
    var ol = $('events');
    ol.replaceChildren.apply(ol, shown.slice().reverse().map(function (e) {
      var li = el('li'); li.setAttribute('data-type', e.type);
      var t = el('time', '', clock(e.t)); t.dateTime = new Date(e.t).toISOString();
      li.append(t, el('span', 'pill ' + (e.severity === 'alert' ? 'bad' : e.severity === 'warning' ? 'warn' : ''), e.severity), el('span', 'type', e.type), el('span', 'data', eventText(e.data)));
      return li;
    }));
    if (!shown.length) ol.replaceChildren(el('li', 'dim', 'no events yet'));
  }

  // ---- live log: server-sent events read through fetch (so the token can go in a header)
  var logApp = '', logCtl = null;
  var sleep = function (ms) { return new Promise(function (r) { setTimeout(r, ms); }); };
  function logState(text, cls) { var s = $('logstate'); s.textContent = text; s.className = 'pill ' + (cls || ''); }
  function logAppend(text, cls) {
    var box = $('log'), atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 24;
    box.append(el('div', cls || '', text));
    while (box.childElementCount > 500) box.firstElementChild.remove();
    if (atEnd) box.scrollTop = box.scrollHeight;
  }
  function onSse(block) {
    var ev = 'message', data = [];
    block.split('\n').forEach(function (l) {
      if (!l || l[0] === ':') return;
      var i = l.indexOf(':'), f = i < 0 ? l : l.slice(0, i), v = i < 0 ? '' : l.slice(i + 1).replace(/^ /, '');
      if (f === 'event') ev = v; else if (f === 'data') data.push(v);
    });
    if (!data.length) return;
    var d; try { d = JSON.parse(data.join('\n')); } catch (e) { return; }
    if (ev === 'line') logAppend(d.line, d.stream === 'stderr' ? 'err' : '');
    else if (ev === 'state') logAppend('— ' + d.app + ' ' + d.state + (d.pid ? ' (pid ' + d.pid + ')' : '') + ', restarts ' + d.restarts, 'sys');
    else if (ev === 'gap') logAppend('— ' + d.dropped + ' lines dropped (reader too slow)', 'sys');
    else if (ev === 'end') logAppend('— stream ended: ' + d.reason, 'sys');
  }
  function follow(app) {
    if (logCtl) logCtl.abort();
    logApp = app; $('log').replaceChildren();
    if (!app) return;
    var ctl = new AbortController(); logCtl = ctl;
    (async function () {
      var delay = 1000;
      while (!ctl.signal.aborted) {
        try {
          logState('connecting', 'warn');
          var r = await fetch('/api/v1/apps/' + encodeURIComponent(app) + '/logs/follow?lines=200', { headers: auth(), signal: ctl.signal, cache: 'no-store' });
          if (!r.ok) { var b = await r.json().catch(function () { return null; }); throw new Error(b && b.error ? b.error.code : 'HTTP ' + r.status); }
          $('log').replaceChildren(); // the backlog comes again with every connection
          logState('live', 'ok'); delay = 1000;
          var rd = r.body.getReader(), dec = new TextDecoder(), buf = '';
          for (;;) {
            var x = await rd.read();
            if (x.done) break;
            buf += dec.decode(x.value, { stream: true }).replace(/\r\n?/g, '\n');
            var i;
            while ((i = buf.indexOf('\n\n')) >= 0) { onSse(buf.slice(0, i)); buf = buf.slice(i + 2); }
          }
          logState('disconnected', 'bad');
        } catch (e) {
          if (ctl.signal.aborted) return;
          logState(e.message || String(e), 'bad');
        }
        await sleep(delay); delay = Math.min(delay * 2, 15000);
      }
    })();
  }
  $('logapp').addEventListener('change', function () { follow($('logapp').value); });

  // ---- updates (docs/ota.md): the one in progress, the last ones, and upload of a bundle file
  function upText(u) {
    var what = (u.kind || u.wantKind || 'bundle') + ' ' + (u.name || u.wantName || '') + (u.version ? ' ' + u.version : '');
    var from = u.previousVersion ? ' (from ' + u.previousVersion + ')' : '';
    return what + from + ' via ' + u.source;
  }
  function upClass(st) { return st === 'committed' ? 'ok' : st === 'rolled-back' || st === 'failed' ? 'bad' : 'warn'; }
  async function refreshUpdates() {
    var u = await getJson('/api/v1/updates');
    var cur = $('upcur');
    cur.replaceChildren();
    if (u.current && u.current.state !== 'committed' && u.current.state !== 'rolled-back' && u.current.state !== 'failed') {
      cur.append(el('span', 'pill ' + upClass(u.current.state), u.current.state), ' ', upText(u.current));
    } else cur.append(el('span', 'dim', 'no update in progress' + (u.queued ? ', ' + u.queued + ' queued' : '')));
    var ol = $('uphist');
    ol.replaceChildren.apply(ol, (u.history || []).slice(-5).reverse().map(function (h) {
      var li = el('li'); li.setAttribute('data-state', h.state);
      var t = el('time', '', clock(h.updatedAt)); t.dateTime = new Date(h.updatedAt).toISOString();
      li.append(t, el('span', 'pill ' + upClass(h.state), h.state), el('span', 'type', upText(h)), el('span', 'data', h.reason ? (h.code ? h.code + ': ' : '') + h.reason : ''));
      return li;
    }));
  }
  $('upload').addEventListener('click', async function () {
    var f = $('bundle').files[0], m = $('upmsg'), b = $('upload');
    if (!f) { m.textContent = 'choose a bundle file first'; m.className = 'bad'; return; }
    if (!tok.value.trim()) { say('Enter the technician token to install a bundle.', 'bad'); tok.focus(); return; }
    b.disabled = true; m.className = 'dim'; m.textContent = 'uploading ' + bytes(f.size) + '…';
    try {
      var r = await fetch('/api/v1/updates', { method: 'POST', headers: Object.assign({ 'content-type': 'application/octet-stream' }, auth()), body: f });
      var body = await r.json().catch(function () { return null; });
      if (r.ok) { m.textContent = 'accepted; verifying and installing'; m.className = 'ok'; }
      else { m.textContent = body && body.error ? body.error.code + ': ' + body.error.message : 'HTTP ' + r.status; m.className = 'bad'; }
    } catch (e) { m.textContent = e.message; m.className = 'bad'; }
    b.disabled = false;
    refresh();
  });

  // ---- polling
  var busy = false, ticks = 0;
  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      renderStatus(await getJson('/api/v1/status'));
      await refreshEvents();
      await refreshUpdates();
      // every 10 s; every 2 s until the first points exist (a fresh agent has none)
      if (ticks++ % 5 === 0 || !havePoints) await refreshHistory();
      $('conn').textContent = 'connected'; $('conn').className = 'pill ok';
      $('updated').textContent = 'updated ' + clock(Date.now());
    } catch (e) {
      var c = $('conn');
      if (e.status === 401 && tok.value.trim()) { c.textContent = 'token rejected'; say('The agent does not accept this token: check it (or Forget it).', 'bad'); }
      else if (e.status === 401) { c.textContent = 'token needed'; say('This agent needs a token to read (LAN access): enter the read-only or technician token.', 'bad'); }
      else c.textContent = 'agent unreachable';
      c.className = 'pill bad';
    }
    busy = false;
  }
  tok.addEventListener('change', function () { refresh(); if (logApp) follow(logApp); });
  refresh();
  setInterval(refresh, 2000);
})();
`;
