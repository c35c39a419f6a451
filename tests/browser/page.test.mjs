// The bidder page in a real browser (Debian's Chromium, driven by
// playwright-core) against a running gavel node at GAVEL_URL.
//
// Three people, each in their own browser context: sally registers and sells;
// alice finds the auction in the live list; bob opens the shared link on a
// phone-sized screen in German, through a TCP proxy this script can cut, so
// that his page must reconnect and resume. Run by tests/api/page.rs.
//
//   GAVEL_URL=http://127.0.0.1:8080 SCREENSHOT_DIR=out node page.test.mjs

import net from 'node:net';
import fs from 'node:fs';
import path from 'node:path';
import assert from 'node:assert/strict';
import { chromium } from 'playwright-core';

const base = process.env.GAVEL_URL;
if (!base) throw new Error('GAVEL_URL is not set');
const screenshots = process.env.SCREENSHOT_DIR || 'out';
fs.mkdirSync(screenshots, { recursive: true });
const STEP_MS = Number(process.env.STEP_TIMEOUT_MS || 20000);

function log(...parts) {
  console.log(`[${new Date().toISOString()}]`, ...parts);
}

// ------------------------------------------------------------- the proxy

/** A TCP proxy in front of gavel whose connections can be cut. */
function startProxy(target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  let down = false;
  const server = net.createServer((client) => {
    if (down) {
      client.destroy();
      return;
    }
    const upstream = net.connect(Number(port), hostname);
    for (const socket of [client, upstream]) {
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
      socket.on('error', () => {});
    }
    client.pipe(upstream);
    upstream.pipe(client);
    client.on('close', () => upstream.destroy());
    upstream.on('close', () => client.destroy());
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => {
      resolve({
        url: `http://127.0.0.1:${server.address().port}`,
        cut() {
          down = true;
          for (const socket of sockets) socket.destroy();
        },
        restore() {
          down = false;
        },
        close() {
          for (const socket of sockets) socket.destroy();
          server.close();
        },
      });
    });
  });
}

// ------------------------------------------------------------ the people

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});
const proxy = await startProxy(base);
const problems = [];

async function person(name, options, origin, clockSkewMs = 0) {
  const context = await browser.newContext({ baseURL: origin, ...options });
  if (clockSkewMs) {
    // This device's clock is wrong: the page must count down by the server's.
    await context.addInitScript((skew) => {
      const realNow = Date.now.bind(Date);
      Date.now = () => realNow() + skew;
    }, clockSkewMs);
  }
  context.setDefaultTimeout(STEP_MS);
  const page = await context.newPage();
  page.consoleErrors = [];
  page.on('pageerror', (error) => problems.push(`${name}: page error: ${error.message}`));
  page.on('console', (message) => {
    if (message.type() === 'error' || message.type() === 'warning') page.consoleErrors.push(message.text());
  });
  page.person = name;
  return page;
}

const desktop = { viewport: { width: 1280, height: 860 }, locale: 'en-US' };
const sally = await person('sally', desktop, base);
const alice = await person('alice', desktop, base);
const bob = await person('bob', { viewport: { width: 375, height: 740 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2, locale: 'de-DE' }, proxy.url, 3600 * 1000);

const euro = (locale, minor) => new Intl.NumberFormat(locale, { style: 'currency', currency: 'EUR' }).format(minor / 100);
const enEur = (minor) => euro('en-US', minor);
const deEur = (minor) => euro('de-DE', minor);

async function shot(page, name) {
  await page.screenshot({ path: path.join(screenshots, `${name}.png`), fullPage: true });
}

async function noSidewaysScroll(page, where) {
  const widths = await page.evaluate(() => ({ scroll: document.documentElement.scrollWidth, view: window.innerWidth }));
  assert.ok(widths.scroll <= widths.view, `${page.person} (${where}): page is ${widths.scroll}px wide in a ${widths.view}px screen`);
}

async function everyControlLabelled(page, where) {
  const unlabelled = await page.evaluate(() => [...document.querySelectorAll('input, select, textarea, button')]
    .filter((element) => {
      const named = element.labels?.length > 0 || element.getAttribute('aria-label') || (element.tagName === 'BUTTON' && element.textContent.trim());
      return !named;
    })
    .map((element) => element.outerHTML));
  assert.deepEqual(unlabelled, [], `${page.person} (${where}): controls without a label`);
}

async function register(page, username) {
  await page.goto('/');
  await page.locator('#connection[data-state="live"]').waitFor();
  await page.getByLabel('Username').fill(username);
  await page.getByLabel('Password').fill(`${username}-secret-pw`);
  await page.getByRole('button', { name: 'Create account' }).click();
  await page.locator('#whoami', { hasText: username }).waitFor();
}

/** Waits until the element's text is exactly `text` (a live update, no reload). */
async function expectText(page, selector, text) {
  await page.locator(selector).filter({ hasText: text }).first().waitFor();
  const actual = (await page.locator(selector).first().textContent()).trim();
  assert.equal(actual, text, `${page.person}: ${selector}`);
}

async function bid(page, amount, max) {
  await page.locator('#bid-amount').fill(amount);
  if (max !== undefined) await page.locator('#bid-max').fill(max);
  await page.locator('#bid-submit').click();
}

let failed = false;
try {
  // Signed out, the home page asks to sign in; the sign-in form is keyboard-usable.
  await sally.goto('/');
  await sally.locator('#connection[data-state="live"]').waitFor();
  // Chromium negotiates permessage-deflate: every live update below reaches
  // the pages compressed, and what they send may be compressed too.
  const extensions = await sally.evaluate(() => new Promise((resolve, reject) => {
    const socket = new WebSocket(`${location.origin.replace(/^http/, 'ws')}/ws`);
    socket.onopen = () => { resolve(socket.extensions); socket.close(); };
    socket.onerror = () => reject(new Error('the WebSocket did not open'));
  }));
  assert.equal(extensions, 'permessage-deflate; client_no_context_takeover', 'the extension Chromium agreed to');
  await everyControlLabelled(sally, 'signed out');
  await sally.getByLabel('Username').fill('no');
  await sally.getByLabel('Password').fill('short');
  await sally.getByLabel('Password').press('Enter');
  await sally.locator('#auth-username-error', { hasText: 'lowercase letters' }).waitFor();
  assert.equal(await sally.evaluate(() => document.activeElement.id), 'auth-username', 'focus moves to the first field in error');

  await register(sally, 'sally');
  await register(alice, 'alice');
  await register(bob, 'bob');
  await noSidewaysScroll(bob, 'home');
  log('three people registered');

  // Sally creates an auction from the form.
  await everyControlLabelled(sally, 'signed in');
  await sally.getByLabel('Title').fill('Leica M6, 1984, with 50mm Summicron');
  await sally.getByLabel('Description').fill('Film camera in working order.\nShutter serviced in 2025.');
  await sally.getByLabel('Currency').selectOption('EUR');
  await sally.getByLabel('Starting price').fill('100');
  await sally.getByLabel('Reserve price (optional)').fill('120.00');
  await sally.getByLabel('Minimum increment').fill('5.00');
  await sally.getByLabel('Duration', { exact: true }).fill('30');
  await sally.getByLabel('Duration unit').selectOption('1');
  await sally.getByLabel('Soft close (seconds)').fill('30');
  await shot(sally, '05-create');
  await sally.getByRole('button', { name: 'Start auction' }).click();
  await sally.waitForURL(/\/auctions\/[0-9a-f-]{36}$/);
  const auctionPath = new URL(sally.url()).pathname;
  await expectText(sally, '#price', enEur(10000));
  await sally.getByText('You are the seller').waitFor();
  await sally.getByText(`Your reserve: ${enEur(12000)} (not met yet)`).waitFor();
  log('auction created at', auctionPath);

  // Alice finds it in the live list, with a countdown, and follows the link.
  await alice.goto('/');
  const item = alice.locator('.auction-item', { hasText: 'Leica M6' });
  await item.waitFor();
  await item.locator('.countdown').filter({ hasText: /\d+s$/ }).waitFor();
  await item.getByText(enEur(10000)).waitFor();
  await shot(alice, '01-home');
  await item.getByRole('link').click();
  await alice.waitForURL(`**${auctionPath}`);

  // Bob opens the shared link on his phone, whose clock is an hour fast: his
  // countdown still shows the seconds left, not an auction long over.
  await bob.goto(auctionPath);
  await expectText(bob, '#price', deEur(10000));
  await bob.locator('#countdown').filter({ hasText: /^([1-9]|[12]\d|30)s$/ }).waitFor();
  await expectText(alice, '#viewers', '3');
  await expectText(bob, '#leader', 'no bids yet');

  // Alice's form has the minimum pre-filled; she bids with the keyboard.
  assert.equal(await alice.locator('#bid-amount').inputValue(), '100.00');
  await alice.locator('#bid-amount').press('Enter');
  await alice.locator('#bid-message.success', { hasText: `You are the highest bidder at ${enEur(10000)}` }).waitFor();
  await expectText(bob, '#price', deEur(10000));
  await expectText(bob, '#leader', 'alice');
  await expectText(bob, '#bid-count', '1');
  await expectText(sally, '#leader', 'alice');
  log('alice bid 100.00');

  // Bob types too little, German style, and is told the minimum.
  assert.equal(await bob.locator('#bid-amount').inputValue(), '105,00', 'pre-filled the German way');
  await bid(bob, '101,50');
  await bob.locator('#bid-message.error', { hasText: `Your bid is too low. The minimum bid is ${deEur(10500)}.` }).waitFor();
  const endBefore = await alice.locator('#countdown').getAttribute('datetime');

  // Bob outbids alice; she is told at once, and the end moves (soft close).
  await bid(bob, '110,00');
  await bob.locator('#bid-message.success').waitFor();
  await alice.locator('.alert.outbid', { hasText: `You have been outbid. The price is now ${enEur(11000)}.` }).waitFor();
  await expectText(alice, '#price', enEur(11000));
  await expectText(alice, '#leader', 'bob');
  await alice.locator('.notice', { hasText: 'Extended' }).waitFor();
  const endAfter = await alice.locator('#countdown').getAttribute('datetime');
  assert.ok(Date.parse(endAfter) > Date.parse(endBefore), `soft close moved the end: ${endBefore} -> ${endAfter}`);
  await shot(alice, '02-auction');
  log('bob outbid alice');

  // Alice answers with a proxy maximum; now bob is outbid.
  await bid(alice, '115.00', '200.00');
  // Her maximum is above the reserve, so the price jumps to the reserve.
  await alice.locator('#bid-message.success', { hasText: `You are the highest bidder at ${enEur(12000)}` }).waitFor();
  await bob.locator('.alert.outbid', { hasText: deEur(12000) }).waitFor();
  await expectText(bob, '#price', deEur(12000));
  await bob.getByText('Reserve not met yet').waitFor({ state: 'detached' });
  await noSidewaysScroll(bob, 'auction, outbid');
  await shot(bob, '03-phone');

  // Bob's connection drops; the page says so, reconnects and resumes: a bid
  // made meanwhile (alice raising her maximum) appears without a reload.
  proxy.cut();
  await bob.locator('#connection[data-state="reconnecting"]').waitFor();
  await bid(alice, '125.00', '250.00');
  await alice.locator('#bid-message.success').filter({ hasText: enEur(12000) }).waitFor();
  await expectText(alice, '#bid-count', '4');
  assert.equal((await bob.locator('#bid-count').textContent()).trim(), '3', 'bob missed the raise while cut off');
  proxy.restore();
  await bob.locator('#connection[data-state="live"]').waitFor();
  await expectText(bob, '#bid-count', '4');
  await expectText(bob, '#leader', 'alice');
  log('bob reconnected and caught up');

  // A reload keeps what alice needs: she leads, with her maximum.
  await alice.reload();
  await alice.getByText(`You are the highest bidder, with a maximum of ${enEur(25000)}.`).waitFor();

  // Bob tries again; alice's maximum keeps her ahead.
  await bid(bob, '130,00');
  await bob.locator('#bid-message.warning', { hasText: `another bidder’s maximum is higher. The price is now ${deEur(13500)}` }).waitFor();
  await expectText(alice, '#price', enEur(13500));
  await expectText(sally, '#price', enEur(13500));
  await sally.getByText(`Your reserve: ${enEur(12000)} (met)`).waitFor();
  const rows = await bob.locator('#history tr').count();
  assert.equal(rows, 5, 'every bid in bob’s history');

  // The end: all three see the winner, alice is told she won.
  const endAt = Date.parse(await alice.locator('#countdown').getAttribute('datetime'));
  const waitMs = Math.max(0, endAt - Date.now()) + 15000;
  log(`waiting ${Math.round(waitMs / 1000)} s at most for the end`);
  await alice.locator('#outcome', { hasText: `You won this auction for ${enEur(13500)}.` }).waitFor({ timeout: waitMs });
  await alice.locator('.alert.won').waitFor();
  await bob.locator('#outcome', { hasText: `Ended. Sold to alice for ${deEur(13500)}.` }).waitFor();
  await sally.locator('#outcome', { hasText: `Ended. Sold to alice for ${enEur(13500)}.` }).waitFor();
  assert.equal(await bob.locator('#bid-amount').count(), 0, 'no bid form after the end');
  await noSidewaysScroll(bob, 'ended');
  await shot(alice, '04-won');
  await shot(bob, '06-phone-ended');

  // Bob's phone-sized home page has no sideways scroll either.
  await bob.goto('/');
  await bob.locator('#auction-list .empty').waitFor();
  await noSidewaysScroll(bob, 'home, signed in');

  // Links to no auction say so.
  for (const link of ['/auctions/01a2022e-d52b-7635-8d26-ce5e879f8e42', '/auctions/%zz', '/auctions/not-an-id']) {
    await bob.goto(link);
    await bob.getByRole('heading', { name: 'Auction not found' }).waitFor();
  }
  log('the auction ended with alice as the winner');

  // Console: nothing but the expected refusals (a 409 for the low bid, the
  // 404s of the links to no auction, the cut WebSocket on bob's side).
  const allowed = {
    sally: [],
    alice: [],
    bob: [/status of 409/, /status of 404/, /WebSocket connection to .* failed/, /net::ERR_(CONNECTION_RESET|CONNECTION_CLOSED|CONNECTION_REFUSED|EMPTY_RESPONSE)/],
  };
  for (const page of [sally, alice, bob]) {
    for (const text of page.consoleErrors) {
      if (!allowed[page.person].some((pattern) => pattern.test(text))) problems.push(`${page.person}: console: ${text}`);
    }
  }
  assert.deepEqual(problems, [], 'no page errors');
  log('passed');
} catch (error) {
  failed = true;
  console.error(error);
  for (const page of [sally, alice, bob]) {
    await shot(page, `failure-${page.person}`).catch(() => {});
  }
  if (problems.length) console.error('page problems:', problems);
} finally {
  await browser.close();
  proxy.close();
}
process.exit(failed ? 1 : 0);
