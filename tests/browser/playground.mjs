// End-to-end test of the nearspan playground in headless Chromium (Debian's package),
// driven by playwright-core. It starts no server: scripts/browser-test does, over the
// smart-home index, and passes its URL.
//
//   NEARSPAN_URL   the server, e.g. http://127.0.0.1:8080 (required)
//   SCREENSHOT     where to save a PNG of the playground (optional)
//   CHROMIUM       the browser (default /usr/bin/chromium)
//   NEARSPAN_API_KEY  typed into the playground when the server wants one (optional)

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const base = (process.env.NEARSPAN_URL || "").replace(/\/$/, "");
if (!base) {
  console.error("set NEARSPAN_URL to the playground's server");
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const userDataDir = mkdtempSync(join(tmpdir(), "nearspan-chromium-"));
const TIMEOUT = 20_000;

const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath,
  headless: true,
  viewport: { width: 1100, height: 900 },
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
context.setDefaultTimeout(TIMEOUT);

let failed = false;
try {
  const page = context.pages()[0] || (await context.newPage());
  // The playground must need nothing but its own server (no CDN).
  const foreign = [];
  page.on("request", (r) => {
    if (!r.url().startsWith(base) && !r.url().startsWith("data:")) foreign.push(r.url());
  });
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));

  const step = (name) => console.log(`- ${name}`);
  const intentIs = (label) => page.waitForFunction((l) => document.getElementById("intent-label").textContent === l, label);
  const slots = () =>
    page.$$eval("#text mark.slot", (marks) =>
      marks.map((m) => ({ label: m.dataset.label, text: [...m.querySelectorAll(".w, .g")].map((w) => w.textContent).join("") })),
    );
  const parse = async (text) => {
    await page.fill("#utterance", text);
    const answered = page.waitForResponse((r) => r.url().endsWith("/v1/parse"));
    await page.press("#utterance", "Enter");
    assert.equal((await answered).status(), 200);
  };
  const whyRows = () =>
    page.$$eval("#neighbours tbody tr.neighbour", (rows) =>
      rows.map((r) => ({
        similarity: Number(r.querySelector(".sim").textContent),
        example: r.querySelector(".example").textContent,
        span: r.querySelector(".example b")?.textContent ?? null,
        label: r.querySelector(".label").textContent,
      })),
    );

  step("the page loads from the server alone");
  await page.goto(`${base}/`);
  await page.waitForFunction(() => /\d+ examples/.test(document.getElementById("index-info").textContent));

  step("parse: intent with its confidence, slots highlighted one colour per label");
  await parse("turn on the bedroom lamp");
  await intentIs("turn_on");
  const score = Number(await page.textContent("#intent-score"));
  assert.ok(score > 0.5 && score <= 1.0001, `intent score ${score}`);
  assert.deepEqual(await slots(), [
    { label: "room", text: "bedroom" },
    { label: "device", text: "lamp" },
  ]);
  const colours = await page.$$eval("#text mark.slot", (ms) => ms.map((m) => getComputedStyle(m).backgroundColor));
  assert.notEqual(colours[0], colours[1], "two labels, one colour");

  step("click a slot: the neighbour examples that justify it, with their similarity");
  await page.click('#text mark.slot[data-label="device"]');
  await page.waitForSelector("#why:not([hidden])");
  let rows = await whyRows();
  assert.ok(rows.length >= 1, "no neighbours shown");
  assert.equal(rows[0].label, "device");
  assert.equal(rows[0].span, "lamp");
  assert.ok(rows.every((r) => r.similarity > 0 && r.similarity <= 1.0001), JSON.stringify(rows));
  assert.ok(rows.every((r, i) => i === 0 || rows[i - 1].similarity >= r.similarity), "neighbours not sorted");

  step("click the intent: the nearest example utterances");
  await page.click("#intent");
  await page.waitForFunction(() => document.getElementById("why-title").textContent.includes("intent"));
  rows = await whyRows();
  assert.equal(rows[0].label, "turn_on");
  assert.equal(rows[0].span, null);

  step("correct: select words, label them, set the intent, add the example");
  const utterance = "make the hallway light sky blue";
  await parse(utterance);
  await page.waitForFunction((t) => document.getElementById("draft").textContent.startsWith(t.slice(0, 4)), utterance);
  const before = await page.textContent("#intent-label");
  assert.notEqual(before, "set_colour");
  const words = await page.$$("#text .w");
  const texts = await Promise.all(words.map((w) => w.textContent()));
  const from = await words[texts.indexOf("sky")].boundingBox();
  const to = await words[texts.indexOf("blue")].boundingBox();
  await page.mouse.move(from.x + 2, from.y + from.height / 2);
  await page.mouse.down();
  await page.mouse.move(to.x + to.width - 2, to.y + to.height / 2, { steps: 8 });
  await page.mouse.up();
  await page.waitForFunction(() => document.getElementById("selection").textContent.includes("“sky blue”"));
  await page.fill("#slot-label", "colour");
  await page.click("#set-slot");
  await page.waitForFunction(() => [...document.querySelectorAll("#draft mark.slot")].some((m) => m.dataset.label === "colour"));
  await page.fill("#intent-input", "set_colour");
  if (await page.isVisible("#api-key")) await page.fill("#api-key", process.env.NEARSPAN_API_KEY || "");
  const added = page.waitForResponse((r) => r.url().endsWith("/v1/examples"));
  await page.click("#add-example");
  assert.equal((await added).status(), 200, "adding the example failed");
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("added"));

  step("the same query now reflects the example");
  await intentIs("set_colour");
  let now = await slots();
  assert.ok(now.some((s) => s.label === "colour" && s.text === "sky blue"), JSON.stringify(now));
  await parse(utterance); // typed again, from scratch
  await intentIs("set_colour");
  now = await slots();
  assert.ok(now.some((s) => s.label === "colour" && s.text === "sky blue"), JSON.stringify(now));
  await page.click('#text mark.slot[data-label="colour"]');
  await page.waitForFunction(() => document.getElementById("why-title").textContent.includes("colour"));
  rows = await whyRows();
  assert.equal(rows[0].example, utterance);
  assert.equal(rows[0].span, "sky blue");
  assert.ok(rows[0].similarity > 0.999, `similarity ${rows[0].similarity}`);

  step("a nearby utterance is labeled by the new example too");
  await parse("turn the kitchen light sky blue");
  now = await slots();
  assert.ok(now.some((s) => s.label === "colour" && s.text === "sky blue"), JSON.stringify(now));
  await page.click('#text mark.slot[data-label="colour"]');
  await page.waitForFunction(() => document.getElementById("why-title").textContent.includes("colour"));

  if (process.env.SCREENSHOT) {
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    console.log(`- screenshot: ${process.env.SCREENSHOT}`);
  }
  assert.deepEqual(foreign, [], "the page requested something outside its server");
  assert.deepEqual(consoleErrors, [], "errors in the browser console");
  console.log("playground: 1 passed, 0 failed");
} catch (e) {
  failed = true;
  console.error(e);
  console.log("playground: 0 passed, 1 failed");
} finally {
  await context.close();
  rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
