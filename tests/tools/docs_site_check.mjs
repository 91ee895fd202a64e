// Drives the docs site in headless Chromium (Debian's package) with playwright-core; prints a JSON report.
// usage: node docs_site_check.mjs <playwright-core dir> <base url> <screenshot path> <user-data-dir>
import { createRequire } from "node:module";

const [pwDir, base, shot, userData] = process.argv.slice(2);
const require = createRequire(pwDir + "/");
const { chromium } = require("playwright-core");

const context = await chromium.launchPersistentContext(userData, {
  executablePath: "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const report = { pages: {}, external: [], errors: [] };
try {
  const page = context.pages()[0] || await context.newPage();
  page.on("request", (r) => { if (!r.url().startsWith(base) && !r.url().startsWith("data:")) report.external.push(r.url()); });
  page.on("pageerror", (e) => report.errors.push(String(e)));
  await page.goto(base + "/", { waitUntil: "load" });
  report.pages.setup = { title: await page.title(), h2: await page.textContent("#page-title"),
                         snippets: await page.locator("pre code").allTextContents() };
  for (const name of ["Instructions", "Tools", "Resources", "Prompts", "Guides"]) {
    await page.click(`nav >> text=${name}`);
    await page.waitForLoadState("load");
    report.pages[name.toLowerCase()] = { url: page.url(), h2: await page.textContent("#page-title"),
                                         current: await page.textContent("nav a.current") };
  }
  await page.click("nav >> text=Tools");
  report.tools = await page.locator("section.item h3 code").allTextContents();
  report.runParams = await page.locator("#run table tbody tr").allTextContents();
  await page.click("nav >> text=Guides");
  await page.click("#guide-workflow summary");
  report.guideVisible = await page.isVisible("#guide-workflow h3");
  await page.click("nav >> text=Setup");
  await page.screenshot({ path: shot, fullPage: true });
} finally {
  await context.close();
}
console.log(JSON.stringify(report));
