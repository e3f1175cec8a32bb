// Validates the demo's exports and loads them into real viewers in
// headless Chromium (see scripts/viewer_check.sh, which passes:
// OUT_DIR NODE_MODULES VENDORED_SCHEMA CHROMIUM).
'use strict';
const fs = require('fs');
const path = require('path');

const [out, modules, vendoredSchema, chromiumPath] = process.argv.slice(2);
const fail = (msg) => {
  console.error(`FAIL: ${msg}`);
  process.exit(1);
};
const read = (f) => JSON.parse(fs.readFileSync(path.join(out, f), 'utf8'));
const expect = read('expect.json');

// 1. speedscope export against the schema speedscope publishes.
const release = path.join(modules, 'speedscope', 'dist', 'release');
const schema = JSON.parse(fs.readFileSync(path.join(release, 'file-format-schema.json'), 'utf8'));
const vendored = JSON.parse(fs.readFileSync(vendoredSchema, 'utf8'));
if (JSON.stringify(schema) !== JSON.stringify(vendored)) {
  fail(`${vendoredSchema} differs from speedscope's published schema`);
}
console.log(`speedscope ${require(path.join(modules, 'speedscope', 'package.json')).version}: ` +
  'the schema in test/support/fixtures is the published one');
const Ajv = require('ajv');
const ajv = new Ajv({ allErrors: true, strict: false });
const validate = ajv.compile(schema);
const ss = read('demo.speedscope.json');
if (!validate(ss)) fail(`speedscope export: ${ajv.errorsText(validate.errors)}`);
let opens = 0;
ss.profiles.forEach((p, i) => {
  const stack = [];
  let last = p.startValue;
  for (const e of p.events) {
    if (e.frame < 0 || e.frame >= ss.shared.frames.length) fail(`profile ${i}: frame ${e.frame}`);
    if (e.at < last || e.at > p.endValue) fail(`profile ${i}: at ${e.at} out of order`);
    last = e.at;
    if (e.type === 'O') { stack.push(e.frame); opens++; }
    else if (stack.pop() !== e.frame) fail(`profile ${i}: close of ${e.frame} does not match`);
  }
  if (stack.length) fail(`profile ${i}: ${stack.length} frames left open`);
});
console.log(`speedscope export: valid against the published schema (ajv); ${ss.profiles.length} ` +
  `profiles, ${ss.shared.frames.length} frames, ${opens} calls; opens and closes nest`);

// 2. Chrome trace against the format's rules.
const ct = read('demo.chrome.json');
const ns = (us) => Math.round(us * 1000);
const threads = new Map();
const flows = new Map();
const named = new Set();
const namedProcs = new Set();
const counts = {};
for (const e of ct.traceEvents) {
  counts[e.ph] = (counts[e.ph] || 0) + 1;
  if (typeof e.ph !== 'string' || !Number.isInteger(e.pid) || !Number.isInteger(e.tid)) fail(`bad event ${JSON.stringify(e)}`);
  if (e.ph === 'M') {
    if (e.name === 'thread_name') named.add(`${e.pid}/${e.tid}`);
    if (e.name === 'process_name') namedProcs.add(e.pid);
    continue;
  }
  if (typeof e.ts !== 'number') fail(`no ts: ${JSON.stringify(e)}`);
  const key = `${e.pid}/${e.tid}`;
  if (!threads.has(key)) threads.set(key, { x: [], be: [] });
  if (e.ph === 'X') {
    if (!(e.dur >= 0)) fail(`X without dur ${JSON.stringify(e)}`);
    threads.get(key).x.push([ns(e.ts), ns(e.ts) + ns(e.dur), e.name]);
  } else if (e.ph === 'B' || e.ph === 'E') {
    threads.get(key).be.push(e);
  } else if (e.ph === 's' || e.ph === 'f') {
    const f = flows.get(e.id) || { s: [], f: [] };
    f[e.ph].push(e);
    flows.set(e.id, f);
  }
}
for (const [key, t] of threads) {
  if (!named.has(key)) fail(`thread ${key} has no thread_name`);
  if (!namedProcs.has(Number(key.split('/')[0]))) fail(`process of ${key} has no process_name`);
  t.x.sort((a, b) => a[0] - b[0] || b[1] - a[1]);
  const open = [];
  for (const x of t.x) {
    while (open.length && open[open.length - 1][1] <= x[0]) open.pop();
    if (open.length && x[1] > open[open.length - 1][1]) fail(`${key}: ${x[2]} overlaps ${open[open.length - 1][2]}`);
    open.push(x);
  }
  let depth = 0;
  for (const e of t.be.sort((a, b) => a.ts - b.ts)) {
    depth += e.ph === 'B' ? 1 : -1;
    if (depth < 0) fail(`${key}: E without B`);
  }
  if (depth !== 0) fail(`${key}: B without E`);
}
for (const [id, f] of flows) {
  if (f.s.length !== 1 || f.f.length !== 1) fail(`flow ${id}: ${f.s.length} starts, ${f.f.length} ends`);
  if (f.f[0].ts < f.s[0].ts) fail(`flow ${id} ends before it starts`);
}
console.log(`chrome trace: ${ct.traceEvents.length} events (${Object.entries(counts).map(([k, v]) => `${k}: ${v}`).join(', ')}); ` +
  `${threads.size} threads, X nest per thread, B/E matched, ${flows.size} flows each with one start and one end`);

// 3. The viewers, in headless Chromium.
(async () => {
  const { chromium } = require('playwright-core');
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist'],
  });
  const page = await browser.newPage({ viewport: { width: 1400, height: 800 } });
  const problems = [];
  page.on('dialog', async (d) => { problems.push(`dialog: ${d.message()}`); await d.dismiss(); });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });
  page.on('request', (r) => { if (!r.url().startsWith('file:') && !r.url().startsWith('data:') && !r.url().startsWith('blob:')) problems.push(`network request: ${r.url()}`); });

  const load = async (file, shots) => {
    problems.length = 0;
    await page.goto('file://' + path.join(release, 'index.html'));
    await page.setInputFiles('input#file', path.join(out, file));
    // The toolbar shows the view tabs once a profile is loaded.
    await page.getByText('Sandwich', { exact: false }).first().waitFor({ timeout: 30000 });
    await page.waitForTimeout(1500);
    if (problems.length) fail(`${file}: ${problems.join('; ')}`);
    const body = await page.locator('body').innerText();
    // Still the welcome screen, or speedscope's import error text.
    if (/Drag and drop|Unrecognized format|went wrong/i.test(body)) fail(`${file}: the page says: ${body.slice(0, 300)}`);
    const saved = [];
    for (const [tab, name] of shots) {
      if (tab) { await page.getByText(tab, { exact: false }).first().click(); await page.waitForTimeout(1000); }
      const png = path.join(out, name);
      await page.screenshot({ path: png });
      saved.push(png);
    }
    return { body, saved };
  };

  // The speedscope export: the busiest process (active profile), then the
  // first Bank process's (fib's calls) in the sandwich view.
  const first = await load('demo.speedscope.json', [[null, 'speedscope-time-order.png'], ['Left Heavy', 'speedscope-left-heavy.png']]);
  const active = ss.profiles[ss.activeProfileIndex].name;
  if (!first.body.includes(active)) fail(`speedscope does not show the active profile ${active}`);
  // Pick the Bank's profile from the profile selector.
  const bankIndex = ss.profiles.findIndex((p) => p.name.startsWith(expect.bank_before));
  if (bankIndex < 0) fail('no profile for the first Bank process');
  // speedscope moves between profiles with 'n' / 'p'.
  const steps = bankIndex - ss.activeProfileIndex;
  await page.locator('body').click({ position: { x: 700, y: 400 } });
  for (let i = 0; i < Math.abs(steps); i++) { await page.keyboard.press(steps > 0 ? 'n' : 'p'); await page.waitForTimeout(200); }
  await page.getByText('Sandwich', { exact: false }).first().click();
  await page.waitForTimeout(1000);
  const sandwich = await page.locator('body').innerText();
  if (!sandwich.includes(ss.profiles[bankIndex].name)) fail(`speedscope did not switch to ${ss.profiles[bankIndex].name}`);
  if (!sandwich.includes(expect.fib)) fail(`no ${expect.fib} frame in the sandwich view`);
  await page.screenshot({ path: path.join(out, 'speedscope-bank-sandwich.png') });
  const fibRows = (sandwich.match(new RegExp(expect.fib.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&'), 'g')) || []).length;
  console.log(`speedscope index.html: loaded ${ss.profiles.length} profiles, showing "${active}"; ` +
    `the Bank profile's sandwich view lists ${expect.fib} (${fibRows} mentions)`);

  // The folded stacks, through speedscope's own folded importer.
  const folded = await load('demo.folded', [[null, 'speedscope-folded.png']]);
  if (!folded.body.includes('demo.folded')) fail('speedscope does not name the folded file');
  console.log('speedscope index.html: loaded the folded stacks');

  // The SVG flame graph in Chromium: frames are <g> elements with titles.
  problems.length = 0;
  await page.goto('file://' + path.join(out, 'demo.svg'));
  await page.waitForTimeout(1000);
  const frames = await page.locator('g > title').count();
  const fibFrames = await page.locator('g > title', { hasText: expect.fib }).count();
  if (problems.length) fail(`demo.svg: ${problems.join('; ')}`);
  if (frames < 3 || fibFrames < 1) fail(`demo.svg: ${frames} frames, ${fibFrames} of fib`);
  await page.screenshot({ path: path.join(out, 'flamegraph.png') });
  console.log(`flame graph SVG: ${frames} frames drawn, ${fibFrames} of them ${expect.fib}`);

  await browser.close();
  console.log(`screenshots in ${out}: speedscope-time-order.png speedscope-left-heavy.png ` +
    'speedscope-bank-sandwich.png speedscope-folded.png flamegraph.png');
  console.log('viewer check: OK');
})().catch((e) => fail(e.stack || String(e)));
