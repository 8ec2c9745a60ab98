/**
 * The technician's page: one self-contained HTML document (no CDN, no external assets),
 * embedded in the executable. Polls the local API; works on a phone screen.
 */
export const PAGE_HTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>fleetlet device</title>
<style>
:root{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1b1f24;background:#f5f6f8}
body{margin:0;padding:12px;max-width:960px;margin:auto}
h1{font-size:1.2rem;margin:.2rem 0} h2{font-size:1rem;margin:1rem 0 .4rem}
.card{background:#fff;border-radius:8px;padding:10px 12px;box-shadow:0 1px 2px #0002;margin-bottom:10px}
.row{display:flex;flex-wrap:wrap;gap:12px;align-items:center}
.pill{padding:2px 8px;border-radius:10px;font-size:.8rem;background:#ddd}
.ok{background:#c9f2d0}.bad{background:#ffd1d1}.warn{background:#ffeab0}
table{width:100%;border-collapse:collapse;font-size:.9rem} td,th{text-align:left;padding:4px 6px;border-bottom:1px solid #eee}
button{font:inherit;padding:4px 10px;border-radius:6px;border:1px solid #888;background:#fff}
pre{background:#111;color:#ddd;padding:8px;border-radius:6px;max-height:40vh;overflow:auto;font-size:.75rem;white-space:pre-wrap}
svg{background:#fafafa;border-radius:4px}
input{font:inherit;padding:3px 6px;width:16em;max-width:100%}
</style></head><body>
<div class="card"><h1 id="device">fleetlet</h1>
<div class="row"><span id="version"></span><span id="uptime"></span><span id="uplink" class="pill">uplink …</span><span id="outbox"></span></div></div>
<div class="card"><div class="row"><div>CPU % <svg id="cpu" width="160" height="36"></svg></div><div>Memory % <svg id="mem" width="160" height="36"></svg></div></div></div>
<div class="card"><h2>Apps</h2><table><thead><tr><th>app</th><th>state</th><th>restarts</th><th>pid</th><th></th></tr></thead><tbody id="apps"></tbody></table>
<div class="row" style="margin-top:6px"><label>Technician token <input id="token" type="password" autocomplete="off"></label><span id="msg"></span></div></div>
<div class="card"><h2>Log <select id="logapp"></select></h2><pre id="log"></pre></div>
<script>
const $=id=>document.getElementById(id);
const tok=$('token'); tok.value=sessionStorage.getItem('fleetlet-token')||''; tok.onchange=()=>sessionStorage.setItem('fleetlet-token',tok.value);
function esc(s){return String(s).replace(/[&<>"']/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]))}
function spark(el,vals){const w=160,h=36;if(!vals.length){el.innerHTML='';return}
 const pts=vals.map((v,i)=>((i/(Math.max(1,vals.length-1)))*w).toFixed(1)+','+(h-(Math.min(100,Math.max(0,v))/100)*h).toFixed(1)).join(' ');
 el.innerHTML='<polyline fill="none" stroke="#2563eb" stroke-width="1.5" points="'+pts+'"/>'}
async function act(app,action){const r=await fetch('/api/v1/apps/'+encodeURIComponent(app)+'/'+action,{method:'POST',headers:{authorization:'Bearer '+tok.value}});
 const b=await r.json().catch(()=>({}));$('msg').textContent=r.ok?app+': '+action+' ok':(b.error?b.error.code+': '+b.error.message:'failed');refresh()}
async function refresh(){try{
 const s=await (await fetch('/api/v1/status')).json();
 $('device').textContent=s.deviceId; $('version').textContent='agent '+s.version; $('uptime').textContent='up '+Math.round(s.uptimeS)+' s';
 const u=$('uplink'); u.textContent=!s.hub.configured?'no hub configured':s.hub.connected?'uplink online':'uplink offline'; u.className='pill '+(s.hub.connected?'ok':'bad');
 $('outbox').textContent='outbox '+s.hub.outbox.depth+' queued';
 const sel=$('logapp'),cur=sel.value;
 $('apps').innerHTML=s.apps.map(a=>'<tr data-app="'+esc(a.name)+'"><td>'+esc(a.name)+'</td><td><span class="pill '+(a.state==='running'?'ok':a.state==='crash-loop'?'bad':'warn')+'">'+esc(a.state)+'</span></td><td class="restarts">'+a.restarts+'</td><td>'+(a.pid??'')+'</td><td><button data-restart="'+esc(a.name)+'">restart</button></td></tr>').join('');
 document.querySelectorAll('[data-restart]').forEach(b=>b.onclick=()=>act(b.dataset.restart,'restart'));
 sel.innerHTML=s.apps.map(a=>'<option'+(a.name===cur?' selected':'')+'>'+esc(a.name)+'</option>').join('');
 const h=await (await fetch('/api/v1/metrics/history')).json();
 spark($('cpu'),h.points.map(p=>p.cpu??0)); spark($('mem'),h.points.map(p=>p.mem??0));
 if(sel.value){const l=await (await fetch('/api/v1/apps/'+encodeURIComponent(sel.value)+'/logs?lines=100')).json();$('log').textContent=l.lines.map(x=>x.stream==='stderr'?'! '+x.line:x.line).join('\\n')}
}catch(e){$('uplink').textContent='agent unreachable';$('uplink').className='pill bad'}}
refresh(); setInterval(refresh,2000);
</script></body></html>`;
