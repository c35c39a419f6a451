// gavel's bidder page: no dependencies, no build step. It speaks the public
// API (docs/API.md): REST for accounts, auctions and bids, one WebSocket for
// live events. Money stays integer minor units from input to request; it is
// only turned into text for display, with Intl.NumberFormat.

const TOKEN_KEY = 'gavel.session';
const LIST_LIMIT = 50;
const LIST_REFRESH_MS = 15000;
const PING_MS = 15000;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30000;
const MAX_AMOUNT = 10n ** 13n;
const CURRENCIES = ['EUR', 'USD', 'GBP', 'CHF', 'JPY', 'SEK', 'NOK', 'DKK', 'PLN', 'CZK', 'CAD', 'AUD'];

// ---------------------------------------------------------------- session

const session = loadSession();

function loadSession() {
  try {
    const saved = JSON.parse(localStorage.getItem(TOKEN_KEY) || 'null');
    if (saved && typeof saved.token === 'string' && saved.user && typeof saved.user.username === 'string') {
      return saved;
    }
  } catch {
    // A damaged entry is the same as none.
  }
  return { token: null, user: null };
}

function signIn(result) {
  session.token = result.token;
  session.user = result.user;
  try {
    localStorage.setItem(TOKEN_KEY, JSON.stringify(session));
  } catch {
    // Private mode or a full store: signed in for this page only.
  }
  live.restart();
  renderAccount();
  render();
}

function signOut(reason) {
  session.token = null;
  session.user = null;
  try {
    localStorage.removeItem(TOKEN_KEY);
  } catch {
    // Nothing was stored.
  }
  live.restart();
  renderAccount();
  render();
  if (reason) showAlert('info', reason);
}

function isMe(user) {
  return Boolean(user && session.user && user.id === session.user.id);
}

// ------------------------------------------------------------------ clock

// Server time minus local time, from the freshest sample with the smallest
// round trip: countdowns use the server's clock, not the device's.
const clock = { offsetMs: 0, rttMs: Infinity, sampledAt: 0 };

function sampleClock(serverTime, sentAt, receivedAt) {
  const server = Date.parse(serverTime);
  if (Number.isNaN(server)) return;
  const rtt = Math.max(0, receivedAt - sentAt);
  const stale = receivedAt - clock.sampledAt > 60000;
  if (rtt <= clock.rttMs || stale) {
    clock.offsetMs = server - (sentAt + receivedAt) / 2;
    clock.rttMs = rtt;
    clock.sampledAt = receivedAt;
  }
}

function serverNow() {
  return Date.now() + clock.offsetMs;
}

function formatRemaining(ms) {
  if (ms <= 0) return 'ending…';
  const total = Math.ceil(ms / 1000);
  const days = Math.floor(total / 86400);
  const hours = Math.floor((total % 86400) / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const seconds = total % 60;
  if (days > 0) return `${days}d ${hours}h ${minutes}m`;
  if (hours > 0) return `${hours}h ${minutes}m ${seconds}s`;
  if (minutes > 0) return `${minutes}m ${seconds}s`;
  return `${seconds}s`;
}

function formatTime(iso) {
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? '' : date.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

// ------------------------------------------------------------------ money

function minorDigits(currency) {
  try {
    return new Intl.NumberFormat('en', { style: 'currency', currency }).resolvedOptions().maximumFractionDigits;
  } catch {
    return 2;
  }
}

/** Integer minor units as text in the auction's currency, without floats. */
function formatMoney(minor, currency) {
  if (minor === null || minor === undefined) return '–';
  const digits = minorDigits(currency);
  const text = BigInt(minor).toString().padStart(digits + 1, '0');
  const decimal = digits > 0 ? `${text.slice(0, -digits)}.${text.slice(-digits)}` : text;
  try {
    return new Intl.NumberFormat(undefined, {
      style: 'currency', currency, minimumFractionDigits: digits, maximumFractionDigits: digits,
    }).format(decimal);
  } catch {
    return `${decimal} ${currency}`;
  }
}

/** The reader's decimal and grouping characters ("." and "," in English). */
const SEPARATORS = (() => {
  const parts = new Intl.NumberFormat().formatToParts(12345.6);
  return {
    decimal: parts.find((part) => part.type === 'decimal')?.value || '.',
    group: parts.find((part) => part.type === 'group')?.value || ',',
  };
})();

/** A minor-units amount as the reader would type it (`125.50`, `125,50`). */
function moneyInput(minor, currency) {
  const digits = minorDigits(currency);
  const text = BigInt(minor).toString().padStart(digits + 1, '0');
  return digits > 0 ? `${text.slice(0, -digits)}${SEPARATORS.decimal}${text.slice(-digits)}` : text;
}

/**
 * Text typed by a person ("1,250.50", "1.250,50", "110,5", "1 250") to
 * integer minor units: `{ value }` or `{ error }`. Exact: strings and BigInt,
 * no floats. With both "." and "," the last one is the decimal point; a lone
 * one is the reader's decimal character, or a group separator when it is
 * their grouping character followed by three digits (or repeated).
 */
function parseMoney(input, currency) {
  const digits = minorDigits(currency);
  const text = String(input).trim().replace(/[\s\u00a0\u202f'_]/g, '');
  const example = digits > 0 ? `125${SEPARATORS.decimal}${'5'.padEnd(digits, '0')}` : '125';
  if (text === '') return { error: 'Enter an amount.' };
  if (!/^[\d.,]+$/.test(text)) return { error: `Enter an amount in ${currency}, like ${example}.` };
  const lastDot = text.lastIndexOf('.');
  const lastComma = text.lastIndexOf(',');
  let decimalAt = -1;
  if (lastDot >= 0 && lastComma >= 0) {
    decimalAt = Math.max(lastDot, lastComma);
  } else if (lastDot >= 0 || lastComma >= 0) {
    const separator = lastDot >= 0 ? '.' : ',';
    const at = Math.max(lastDot, lastComma);
    const repeated = text.indexOf(separator) !== at;
    const grouping = repeated || (separator !== SEPARATORS.decimal && text.length - at - 1 === 3);
    if (!grouping) decimalAt = at;
  }
  const wholeText = decimalAt >= 0 ? text.slice(0, decimalAt) : text;
  if (/[.,]/.test(wholeText) && !/^\d{1,3}([.,]\d{3})+$/.test(wholeText)) {
    return { error: `Enter an amount in ${currency}, like ${example}.` };
  }
  const whole = wholeText.replace(/[.,]/g, '');
  let fraction = decimalAt >= 0 ? text.slice(decimalAt + 1) : '';
  if (/[.,]/.test(fraction) || !/^\d*$/.test(whole) || (whole === '' && fraction === '')) {
    return { error: `Enter an amount in ${currency}, like ${example}.` };
  }
  // Zeros past the currency's decimals change nothing ("1.00" yen is 1 yen).
  if (fraction.length > digits && /^0*$/.test(fraction.slice(digits))) fraction = fraction.slice(0, digits);
  if (fraction.length > digits) {
    return { error: digits === 0 ? `${currency} has no decimals.` : `${currency} has at most ${digits} decimals.` };
  }
  const minor = BigInt(whole || '0') * 10n ** BigInt(digits) + BigInt(fraction.padEnd(digits, '0') || '0');
  if (minor < 1n) return { error: 'The amount must be more than zero.' };
  if (minor > MAX_AMOUNT) return { error: 'That amount is too large.' };
  return { value: Number(minor) };
}

// -------------------------------------------------------------------- api

class ApiFailure extends Error {
  constructor(status, body, retryAfter) {
    const error = (body && body.error) || {};
    super(error.message || `The server answered ${status}.`);
    this.status = status;
    this.code = error.code || (status === 0 ? 'NETWORK' : `HTTP_${status}`);
    this.details = error;
    this.retryAfter = retryAfter;
  }
}

async function api(method, path, body, idempotencyKey) {
  const headers = { Accept: 'application/json' };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  if (idempotencyKey) headers['Idempotency-Key'] = idempotencyKey;
  const sentAt = Date.now();
  let response;
  try {
    response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new ApiFailure(0, { error: { code: 'NETWORK', message: 'Could not reach the server. Check your connection and try again.' } });
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (data && typeof data.server_time === 'string') sampleClock(data.server_time, sentAt, Date.now());
  if (!response.ok) {
    const failure = new ApiFailure(response.status, data, response.headers.get('Retry-After'));
    if (failure.code === 'UNAUTHENTICATED' && session.token) signOut('Your session has ended. Please sign in again.');
    throw failure;
  }
  return data;
}

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
}

// -------------------------------------------------------------------- dom

function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith('on')) element.addEventListener(name.slice(2), value);
    else if (name === 'dataset') Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

function field(id, label, input, hint) {
  const hintId = `${id}-hint`;
  const errorId = `${id}-error`;
  input.id = id;
  input.setAttribute('aria-describedby', hint ? `${hintId} ${errorId}` : errorId);
  return h('div', { class: 'field' },
    h('label', { for: id }, label),
    input,
    hint ? h('p', { class: 'hint', id: hintId }, hint) : null,
    h('p', { class: 'field-error', id: errorId }));
}

function setFieldError(input, message) {
  const error = document.getElementById(`${input.id}-error`);
  if (error) error.textContent = message || '';
  if (message) input.setAttribute('aria-invalid', 'true');
  else input.removeAttribute('aria-invalid');
}

function setMessage(element, kind, text) {
  element.className = `message ${kind}`;
  element.textContent = text;
}

function showAlert(kind, text, action) {
  const region = document.getElementById('alerts');
  const close = h('button', { type: 'button', class: 'link', 'aria-label': 'Dismiss' }, '×');
  const alert = h('div', { class: `alert ${kind}`, dataset: { kind } }, h('span', {}, text), action || null, close);
  close.addEventListener('click', () => alert.remove());
  region.append(alert);
  while (region.children.length > 3) region.firstElementChild.remove();
  if (kind !== 'outbid' && kind !== 'won') setTimeout(() => alert.remove(), 8000);
  return alert;
}

// ----------------------------------------------------------------- router

let view = null;

function navigate(path) {
  if (location.pathname !== path) history.pushState(null, '', path);
  render();
  document.getElementById('main').focus({ preventScroll: true });
  window.scrollTo(0, 0);
}

document.addEventListener('click', (event) => {
  const link = event.target.closest('a[data-route]');
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(link.getAttribute('href'));
});
window.addEventListener('popstate', () => render());

function render() {
  if (view) view.leave();
  const main = document.getElementById('main');
  main.replaceChildren();
  const match = /^\/auctions\/([^/]+)\/?$/.exec(location.pathname);
  let id = null;
  if (match) {
    try {
      id = decodeURIComponent(match[1]);
    } catch {
      id = ''; // Not even a well-formed path: the view says "not found".
    }
  }
  view = id !== null ? new AuctionView(main, id) : new HomeView(main);
  view.enter();
}

function renderAccount() {
  const account = document.getElementById('account');
  if (session.user) {
    account.replaceChildren(
      h('span', {}, 'Signed in as ', h('strong', { id: 'whoami' }, session.user.username)),
      h('button', { type: 'button', class: 'link', onclick: () => signOut() }, 'Sign out'));
  } else {
    account.replaceChildren(h('a', { href: '#signin', onclick: focusSignIn }, 'Sign in'));
  }
}

function focusSignIn(event) {
  const username = document.getElementById('auth-username');
  if (username) {
    event.preventDefault();
    username.focus();
  }
}

// ------------------------------------------------------------------- live

/**
 * One WebSocket for the page: subscriptions survive reconnects (resumed with
 * `since_seq`), reconnects back off exponentially with jitter.
 */
class Live {
  constructor() {
    this.socket = null;
    this.subscriptions = new Map();
    this.listeners = new Set();
    this.attempt = 0;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pingSentAt = 0;
    this.state = 'connecting';
  }

  start() {
    clearTimeout(this.retryTimer);
    const url = new URL('/ws', location.href);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    if (session.token) url.searchParams.set('token', session.token);
    const socket = new WebSocket(url);
    this.socket = socket;
    this.setState(this.attempt === 0 ? 'connecting' : 'reconnecting');
    socket.addEventListener('open', () => {
      if (socket !== this.socket) return;
      this.attempt = 0;
      this.setState('live');
      for (const [auctionId, subscription] of this.subscriptions) this.sendSubscribe(auctionId, subscription);
      this.ping();
      this.pingTimer = setInterval(() => this.ping(), PING_MS);
    });
    socket.addEventListener('message', (event) => {
      if (socket !== this.socket) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this.dispatch(message);
    });
    socket.addEventListener('close', () => {
      if (socket !== this.socket) return;
      clearInterval(this.pingTimer);
      this.socket = null;
      this.scheduleRetry();
    });
  }

  restart() {
    const old = this.socket;
    this.socket = null;
    clearInterval(this.pingTimer);
    if (old) old.close(1000);
    this.attempt = 0;
    this.start();
  }

  scheduleRetry() {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
    const delay = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    this.attempt += 1;
    this.setState('reconnecting', delay);
    this.retryTimer = setTimeout(() => this.start(), delay);
    // A refused upgrade looks like any failure; a stale token shows on REST.
    if (this.attempt === 2 && session.token) api('GET', '/api/v1/users/me').catch(() => {});
  }

  setState(state, delay) {
    this.state = state;
    const indicator = document.getElementById('connection');
    indicator.dataset.state = state;
    if (state === 'live') indicator.textContent = 'Live';
    else if (state === 'connecting') indicator.textContent = 'Connecting…';
    else indicator.textContent = delay ? `Reconnecting in ${Math.ceil(delay / 1000)} s…` : 'Reconnecting…';
  }

  ping() {
    this.pingSentAt = Date.now();
    this.send({ type: 'ping' });
  }

  send(message) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(message));
  }

  sendSubscribe(auctionId, subscription) {
    const message = { type: 'subscribe', auction_id: auctionId };
    if (subscription.lastSeq > 0) message.since_seq = subscription.lastSeq;
    this.send(message);
  }

  /** `handler(message)` gets this auction's messages; returns the subscription. */
  subscribe(auctionId, handler) {
    const subscription = { handler, lastSeq: 0 };
    this.subscriptions.set(auctionId, subscription);
    this.sendSubscribe(auctionId, subscription);
    return subscription;
  }

  unsubscribe(auctionId) {
    if (this.subscriptions.delete(auctionId)) this.send({ type: 'unsubscribe', auction_id: auctionId });
  }

  dispatch(message) {
    if (message.type === 'pong') {
      sampleClock(message.server_time, this.pingSentAt, Date.now());
      return;
    }
    if (message.type === 'outbid' || message.type === 'won') {
      for (const listener of this.listeners) listener(message);
    }
    const subscription = message.auction_id && this.subscriptions.get(message.auction_id);
    if (!subscription) return;
    if (message.type === 'snapshot') subscription.lastSeq = message.auction.seq;
    else if (typeof message.seq === 'number' && message.type !== 'outbid' && message.type !== 'won') {
      subscription.lastSeq = Math.max(subscription.lastSeq, message.seq);
    }
    subscription.handler(message);
  }
}

const live = new Live();

// Private messages of any auction, on any page.
live.listeners.add((message) => {
  if (view instanceof AuctionView && view.id === message.auction_id) return;
  const known = view instanceof HomeView ? view.auctions.get(message.auction_id) : null;
  const title = known ? `“${known.title}”` : 'an auction';
  const price = known ? ` Current price ${formatMoney(message.current_price ?? message.final_price, known.currency)}.` : '';
  const link = h('a', { href: `/auctions/${message.auction_id}`, 'data-route': '' }, message.type === 'won' ? 'See it' : 'Bid again');
  if (message.type === 'outbid') showAlert('outbid', `You have been outbid on ${title}.${price}`, link);
  else showAlert('won', `You won ${title}!`, link);
});

// A countdown for every element that names an end.
setInterval(() => {
  for (const element of document.querySelectorAll('[data-deadline]')) {
    const deadline = Date.parse(element.dataset.deadline);
    element.textContent = formatRemaining(deadline - serverNow());
  }
}, 250);

// ---------------------------------------------------------------- sign in

function authForm() {
  const username = h('input', { type: 'text', name: 'username', autocomplete: 'username', autocapitalize: 'none', spellcheck: 'false', required: true, maxlength: '32' });
  const password = h('input', { type: 'password', name: 'password', autocomplete: 'current-password', required: true, maxlength: '128' });
  const message = h('p', { class: 'message', role: 'status', 'aria-live': 'polite' });
  const signInButton = h('button', { type: 'submit', value: 'login' }, 'Sign in');
  const registerButton = h('button', { type: 'submit', value: 'register', class: 'secondary' }, 'Create account');
  const form = h('form', { class: 'card auth', id: 'signin', novalidate: true, 'aria-labelledby': 'signin-title' },
    h('h2', { id: 'signin-title' }, 'Sign in to bid or sell'),
    field('auth-username', 'Username', username, '3–32 characters: lowercase letters, digits, _'),
    field('auth-password', 'Password', password, 'At least 8 characters'),
    h('div', { class: 'actions' }, signInButton, registerButton),
    message);
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const action = event.submitter && event.submitter.value === 'register' ? 'register' : 'login';
    const name = username.value.trim();
    let invalid = false;
    setFieldError(username, '');
    setFieldError(password, '');
    if (!/^[a-z0-9_]{3,32}$/.test(name)) {
      setFieldError(username, 'Use 3 to 32 lowercase letters, digits or underscores.');
      invalid = true;
    }
    if (password.value.length < 8 || password.value.length > 128) {
      setFieldError(password, 'Use 8 to 128 characters.');
      invalid = true;
    }
    if (invalid) {
      form.querySelector('[aria-invalid="true"]').focus();
      return;
    }
    signInButton.disabled = true;
    registerButton.disabled = true;
    setMessage(message, 'pending', action === 'register' ? 'Creating your account…' : 'Signing in…');
    try {
      const result = await api('POST', `/api/v1/auth/${action}`, { username: name, password: password.value });
      signIn(result);
    } catch (failure) {
      const text = {
        INVALID_CREDENTIALS: 'Wrong username or password.',
        USERNAME_TAKEN: 'That username is taken. Choose another, or sign in.',
        RATE_LIMITED: 'Too many attempts. Wait a moment and try again.',
      }[failure.code] || failure.message;
      setMessage(message, 'error', text);
      signInButton.disabled = false;
      registerButton.disabled = false;
    }
  });
  return form;
}

// ------------------------------------------------------------------- home

class HomeView {
  constructor(root) {
    this.root = root;
    this.auctions = new Map();
    // Auctions seen to end or be cancelled: a list fetched before that
    // must not bring them back.
    this.gone = new Set();
    this.list = h('ul', { class: 'auction-list', id: 'auction-list', 'aria-busy': 'true' });
    this.status = h('p', { class: 'message' });
    this.refreshTimer = null;
    this.left = false;
  }

  enter() {
    document.title = 'gavel — live auctions';
    this.root.append(
      h('section', { class: 'listing', 'aria-labelledby': 'live-title' },
        h('h1', { id: 'live-title' }, 'Live auctions'),
        h('p', { class: 'hint' }, 'Ending soonest first. Prices update as bids arrive.'),
        this.list, this.status),
      session.user ? createForm() : authForm());
    this.refresh();
    this.refreshTimer = setInterval(() => this.refresh(), LIST_REFRESH_MS);
  }

  leave() {
    this.left = true;
    clearInterval(this.refreshTimer);
    for (const id of this.auctions.keys()) live.unsubscribe(id);
  }

  async refresh() {
    let page;
    try {
      page = await api('GET', `/api/v1/auctions?status=active&limit=${LIST_LIMIT}`);
    } catch (failure) {
      if (!this.left) setMessage(this.status, 'error', `Could not load auctions: ${failure.message}`);
      return;
    }
    if (this.left) return;
    setMessage(this.status, '', '');
    const fresh = new Map(page.items.map((auction) => [auction.id, auction]));
    for (const id of this.auctions.keys()) {
      if (!fresh.has(id)) {
        live.unsubscribe(id);
        this.auctions.delete(id);
      }
    }
    for (const auction of page.items) {
      if (this.gone.has(auction.id) || auction.status !== 'active') continue;
      const known = this.auctions.get(auction.id);
      if (known && known.seq > auction.seq) continue;
      this.auctions.set(auction.id, auction);
      if (!known) live.subscribe(auction.id, (message) => this.onMessage(auction.id, message));
    }
    this.draw();
  }

  onMessage(id, message) {
    const auction = this.auctions.get(id);
    if (!auction) return;
    const over = message.type === 'ended' || message.type === 'cancelled'
      || (message.type === 'snapshot' && message.auction.status !== 'active');
    if (over) {
      live.unsubscribe(id);
      this.auctions.delete(id);
      this.gone.add(id);
    } else if (message.type === 'snapshot') Object.assign(auction, message.auction);
    else if (message.type === 'bid' && message.seq > auction.seq) {
      Object.assign(auction, {
        seq: message.seq, current_price: message.current_price, leader: message.leader,
        bid_count: message.bid_count, end_at: message.end_at, reserve_met: message.reserve_met,
      });
    } else if (message.type === 'extended') auction.end_at = message.end_at;
    else return;
    this.draw();
  }

  draw() {
    const items = [...this.auctions.values()].sort((a, b) => Date.parse(a.end_at) - Date.parse(b.end_at));
    this.list.setAttribute('aria-busy', 'false');
    if (items.length === 0) {
      this.list.replaceChildren(h('li', { class: 'empty' }, 'No live auctions right now.', session.user ? ' Start one below.' : ' Sign in to start one.'));
      return;
    }
    this.list.replaceChildren(...items.map((auction) => h('li', { class: 'auction-item', dataset: { auctionId: auction.id } },
      h('a', { href: `/auctions/${auction.id}`, 'data-route': '', class: 'title' }, auction.title),
      h('span', { class: 'price' }, formatMoney(auction.current_price, auction.currency)),
      h('span', { class: 'meta' }, `${auction.bid_count} ${auction.bid_count === 1 ? 'bid' : 'bids'}`),
      h('span', { class: 'meta' }, 'ends in ', h('time', { class: 'countdown', datetime: auction.end_at, dataset: { deadline: auction.end_at } }, formatRemaining(Date.parse(auction.end_at) - serverNow()))))));
  }
}

// ----------------------------------------------------------------- create

function createForm() {
  const title = h('input', { type: 'text', required: true, maxlength: '200' });
  const description = h('textarea', { rows: '3', maxlength: '10000' });
  const currency = h('select', {}, CURRENCIES.map((code) => h('option', { value: code }, code)));
  const starting = h('input', { type: 'text', inputmode: 'decimal', required: true, autocomplete: 'off' });
  const reserve = h('input', { type: 'text', inputmode: 'decimal', autocomplete: 'off' });
  const increment = h('input', { type: 'text', inputmode: 'decimal', required: true, autocomplete: 'off', value: '1.00' });
  const duration = h('input', { type: 'number', min: '1', step: '1', required: true, value: '10' });
  const unit = h('select', { 'aria-label': 'Duration unit' },
    h('option', { value: '1' }, 'seconds'), h('option', { value: '60', selected: true }, 'minutes'),
    h('option', { value: '3600' }, 'hours'), h('option', { value: '86400' }, 'days'));
  const softClose = h('input', { type: 'number', min: '0', max: '3600', step: '1', value: '30' });
  const message = h('p', { class: 'message', role: 'status', 'aria-live': 'polite' });
  const submit = h('button', { type: 'submit' }, 'Start auction');
  let key = newKey();

  const durationField = field('new-duration', 'Duration', duration);
  durationField.insertBefore(h('div', { class: 'inline' }, duration, unit), durationField.querySelector('.hint, .field-error'));
  const form = h('form', { class: 'card create', novalidate: true, 'aria-labelledby': 'create-title' },
    h('h2', { id: 'create-title' }, 'Sell an item'),
    field('new-title', 'Title', title),
    field('new-description', 'Description', description),
    h('div', { class: 'grid' },
      field('new-currency', 'Currency', currency),
      field('new-starting', 'Starting price', starting, 'For example 100.00'),
      field('new-reserve', 'Reserve price (optional)', reserve, 'Hidden from bidders; no sale below it'),
      field('new-increment', 'Minimum increment', increment),
      durationField,
      field('new-soft-close', 'Soft close (seconds)', softClose, 'A bid this close to the end extends it')),
    h('div', { class: 'actions' }, submit),
    message);
  form.addEventListener('input', () => {
    key = newKey();
  });
  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    const code = currency.value;
    const errors = new Map();
    const body = { title: title.value.trim(), description: description.value, currency: code };
    if (!body.title) errors.set(title, 'Give the item a title.');
    for (const [input, name, optional] of [[starting, 'starting_price'], [reserve, 'reserve_price', true], [increment, 'min_increment']]) {
      if (optional && input.value.trim() === '') continue;
      const parsed = parseMoney(input.value, code);
      if (parsed.error) errors.set(input, parsed.error);
      else body[name] = parsed.value;
    }
    const count = Number(duration.value);
    const seconds = count * Number(unit.value);
    if (!Number.isInteger(count) || count < 1) errors.set(duration, 'Enter a whole number above zero.');
    else if (seconds > 30 * 86400) errors.set(duration, 'An auction runs at most 30 days.');
    else body.duration_secs = seconds;
    const close = Number(softClose.value || '0');
    if (!Number.isInteger(close) || close < 0 || close > 3600) errors.set(softClose, 'Enter 0 to 3600 seconds.');
    else body.soft_close_secs = close;
    for (const input of [title, starting, reserve, increment, duration, softClose]) setFieldError(input, errors.get(input));
    if (errors.size > 0) {
      errors.keys().next().value.focus();
      return;
    }
    submit.disabled = true;
    setMessage(message, 'pending', 'Starting your auction…');
    try {
      const auction = await api('POST', '/api/v1/auctions', body, key);
      navigate(`/auctions/${auction.id}`);
    } catch (failure) {
      submit.disabled = false;
      setMessage(message, 'error', failure.code === 'INVALID_AMOUNT' ? `Check the amounts: ${failure.message}` : failure.message);
    }
  });
  return form;
}

// ---------------------------------------------------------------- auction

const HISTORY_ROWS = 50;

class AuctionView {
  constructor(root, id) {
    this.root = root;
    this.id = id;
    this.auction = null;
    this.history = [];
    this.viewers = null;
    this.yourMax = null;
    this.left = false;
    this.amountEdited = false;
    this.pendingKey = null;
  }

  enter() {
    document.title = 'Auction — gavel';
    this.root.append(h('p', { class: 'message pending' }, 'Loading the auction…'));
    this.load();
  }

  leave() {
    this.left = true;
    live.unsubscribe(this.id);
  }

  async load() {
    if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(this.id)) {
      this.notFound();
      return;
    }
    let auction;
    let bids;
    try {
      [auction, bids] = await Promise.all([
        api('GET', `/api/v1/auctions/${this.id}`),
        api('GET', `/api/v1/auctions/${this.id}/bids?limit=${HISTORY_ROWS}`),
      ]);
    } catch (failure) {
      if (this.left) return;
      if (failure.code === 'AUCTION_NOT_FOUND' || failure.status === 400) this.notFound();
      else this.root.replaceChildren(h('p', { class: 'message error' }, `Could not load the auction: ${failure.message}`), h('p', {}, h('a', { href: '/', 'data-route': '' }, 'Back to all auctions')));
      return;
    }
    if (this.left) return;
    // A snapshot that arrived first is at least as new.
    if (!this.auction || this.auction.seq <= auction.seq) {
      this.auction = auction;
      this.history = bids.items.map(historyRow);
      this.build();
    }
    if (!live.subscriptions.has(this.id)) live.subscribe(this.id, (message) => this.onMessage(message));
    if (session.user) this.loadYourMax();
  }

  async loadYourMax() {
    try {
      const mine = await api('GET', '/api/v1/users/me/bids');
      const entry = mine.items.find((item) => item.id === this.id);
      if (entry && !this.left) {
        this.yourMax = entry.your_max;
        this.update();
      }
    } catch {
      // Only a hint; the page works without it.
    }
  }

  async reloadHistory() {
    try {
      const page = await api('GET', `/api/v1/auctions/${this.id}/bids?limit=${HISTORY_ROWS}`);
      if (this.left) return;
      this.history = mergeHistory(this.history, page.items.map(historyRow));
      this.update();
    } catch {
      // The rows shown stay; the next snapshot or reload brings the rest.
    }
  }

  notFound() {
    document.title = 'Auction not found — gavel';
    this.root.replaceChildren(h('section', { class: 'card' },
      h('h1', {}, 'Auction not found'),
      h('p', {}, 'There is no auction at this address. It may have been mistyped.'),
      h('p', {}, h('a', { href: '/', 'data-route': '' }, 'See the live auctions'))));
  }

  onMessage(message) {
    const auction = this.auction;
    switch (message.type) {
      case 'snapshot': {
        // The snapshot brings the last 10 bids; keep the older rows already
        // shown, unless bids are missing in between (then reload them).
        const fresh = message.recent_bids.map(historyRow);
        const newestKnown = this.history.length > 0 ? this.history[0].seq : 0;
        const oldestFresh = fresh.length > 0 ? fresh[fresh.length - 1].seq : message.auction.seq + 1;
        const gap = newestKnown > 0 && oldestFresh > newestKnown + 1;
        this.history = gap ? fresh : mergeHistory(this.history, fresh);
        if (gap) this.reloadHistory();
        this.auction = message.auction;
        this.viewers = message.viewers;
        if (!auction) this.build();
        break;
      }
      case 'bid':
        if (!auction) return;
        if (message.seq === auction.seq) auction.reserve_met = message.reserve_met;
        if (message.seq <= auction.seq) break;
        Object.assign(auction, {
          seq: message.seq, current_price: message.current_price, leader: message.leader,
          bid_count: message.bid_count, end_at: message.end_at, reserve_met: message.reserve_met,
          status: 'active',
        });
        this.history.unshift(historyRow(message));
        this.history.length = Math.min(this.history.length, HISTORY_ROWS);
        break;
      case 'extended':
        if (!auction) return;
        auction.end_at = message.end_at;
        this.notice.textContent = `Extended: a late bid moved the end to ${formatTime(message.end_at)}.`;
        this.announce(this.notice.textContent);
        break;
      case 'started':
        if (auction) auction.status = 'active';
        break;
      case 'ended':
        if (!auction) return;
        Object.assign(auction, { status: 'ended', winner: message.winner, final_price: message.final_price, reserve_met: message.reserve_met });
        break;
      case 'cancelled':
        if (auction) auction.status = 'cancelled';
        break;
      case 'viewers':
        this.viewers = message.count;
        break;
      case 'outbid': {
        if (!auction) return;
        const bidMessage = document.getElementById('bid-message');
        if (bidMessage) setMessage(bidMessage, 'warning', `You have been outbid at ${formatMoney(message.current_price, auction.currency)}.`);
        this.outbidAlert = showAlert('outbid', `You have been outbid. The price is now ${formatMoney(message.current_price, auction.currency)}.`,
          h('button', { type: 'button', class: 'link', onclick: () => document.getElementById('bid-amount')?.focus() }, 'Bid again'));
        break;
      }
      case 'won':
        if (!auction) return;
        showAlert('won', `You won “${auction.title}” for ${formatMoney(message.final_price, auction.currency)}!`);
        break;
      case 'error':
        if (message.code === 'AUCTION_NOT_FOUND') this.notFound();
        return;
      default:
        return;
    }
    this.update();
  }

  /** Says `text` to screen readers (once per change). */
  announce(text) {
    if (this.announcer && this.announcer.textContent !== text) this.announcer.textContent = text;
  }

  build() {
    const auction = this.auction;
    document.title = `${auction.title} — gavel`;
    this.price = h('output', { class: 'price', id: 'price' });
    this.leader = h('span', { id: 'leader' });
    this.bidCount = h('span', { id: 'bid-count' });
    this.viewerCount = h('span', { id: 'viewers' });
    this.reserve = h('span', { id: 'reserve' });
    // Not a live region: it holds a countdown that changes every second.
    // Changes worth saying are announced through `announcer`.
    this.statusLine = h('p', { class: 'status', id: 'status' });
    this.notice = h('p', { class: 'notice' });
    this.announcer = h('p', { class: 'sr-only', role: 'status', 'aria-live': 'polite' });
    this.priceLabel = h('span', { class: 'label' }, 'Current price');
    this.leaderLabel = h('span', { class: 'label' }, 'Leader');
    this.historyList = h('tbody', { id: 'history' });
    this.bidArea = h('div', { id: 'bid-area' });
    this.root.replaceChildren(
      h('p', { class: 'crumbs' }, h('a', { href: '/', 'data-route': '' }, '← All auctions')),
      h('article', { class: 'auction', 'aria-labelledby': 'auction-title' },
        h('div', { class: 'card summary' },
          h('h1', { id: 'auction-title' }, auction.title),
          h('p', { class: 'seller' }, 'Sold by ', h('strong', {}, auction.seller.username)),
          auction.description ? h('p', { class: 'description' }, auction.description) : null,
          h('div', { class: 'figures' },
            h('div', {}, this.priceLabel, this.price),
            h('div', {}, this.leaderLabel, this.leader),
            h('div', {}, h('span', { class: 'label' }, 'Bids'), this.bidCount),
            h('div', {}, h('span', { class: 'label' }, 'Watching'), this.viewerCount)),
          this.reserve,
          this.statusLine,
          this.notice,
          this.announcer),
        h('div', { class: 'card bidding' }, this.bidArea),
        h('section', { class: 'card', 'aria-labelledby': 'history-title' },
          h('h2', { id: 'history-title' }, 'Bid history'),
          h('table', { class: 'history' },
            h('thead', {}, h('tr', {},
              h('th', { scope: 'col' }, 'Bid'), h('th', { scope: 'col' }, 'Price after'),
              h('th', { scope: 'col' }, 'Leader'), h('th', { scope: 'col' }, 'Time'))),
            this.historyList))));
    this.bidState = null;
    this.update();
  }

  update() {
    const auction = this.auction;
    if (!auction || !this.price) return;
    const money = (minor) => formatMoney(minor, auction.currency);
    this.price.textContent = money(auction.current_price);
    this.leader.textContent = auction.leader ? (isMe(auction.leader) ? `${auction.leader.username} (you)` : auction.leader.username) : 'no bids yet';
    this.bidCount.textContent = String(auction.bid_count);
    this.viewerCount.textContent = this.viewers === null ? '–' : String(this.viewers);
    if (auction.reserve_price !== undefined && auction.reserve_price !== null) {
      this.reserve.textContent = `Your reserve: ${money(auction.reserve_price)} (${auction.reserve_met ? 'met' : 'not met yet'})`;
    } else {
      this.reserve.textContent = auction.reserve_met ? '' : 'Reserve not met yet';
    }
    this.reserve.className = auction.reserve_met ? 'reserve met' : 'reserve';

    this.statusLine.replaceChildren(...this.statusParts(auction, money));
    this.statusLine.dataset.status = auction.status;
    const ended = auction.status === 'ended';
    this.priceLabel.textContent = ended && auction.winner ? 'Final price' : 'Current price';
    this.leaderLabel.textContent = ended ? 'Winner' : 'Leader';
    if (ended && !auction.winner) this.leader.textContent = 'none';
    if (auction.status !== 'active') {
      this.notice.textContent = '';
      this.announce(this.statusLine.textContent);
    }
    this.historyList.replaceChildren(...(this.history.length === 0
      ? [h('tr', {}, h('td', { class: 'empty', colspan: '4' }, 'No bids yet.'))]
      : this.history.map((row) => h('tr', { dataset: { seq: row.seq } },
        h('td', { class: 'seq' }, `#${row.seq}`),
        h('td', { class: 'row-price' }, money(row.price)),
        h('td', { class: 'row-leader' }, row.leader ? row.leader.username : ''),
        h('td', {}, h('time', { datetime: row.placedAt }, formatTime(row.placedAt)))))));
    this.updateBidArea(money);
  }

  statusParts(auction, money) {
    if (auction.status === 'active') {
      return ['Ends in ', h('time', { id: 'countdown', class: 'countdown', datetime: auction.end_at, dataset: { deadline: auction.end_at } }, formatRemaining(Date.parse(auction.end_at) - serverNow()))];
    }
    if (auction.status === 'scheduled') {
      return ['Starts in ', h('time', { class: 'countdown', datetime: auction.start_at, dataset: { deadline: auction.start_at } }, formatRemaining(Date.parse(auction.start_at) - serverNow()))];
    }
    if (auction.status === 'cancelled') return ['Cancelled by the seller.'];
    if (auction.winner) {
      if (isMe(auction.winner)) return [h('strong', { id: 'outcome' }, `You won this auction for ${money(auction.final_price)}.`)];
      return [h('strong', { id: 'outcome' }, `Ended. Sold to ${auction.winner.username} for ${money(auction.final_price)}.`)];
    }
    return [h('strong', { id: 'outcome' }, auction.bid_count > 0 ? 'Ended without a sale: the reserve was not met.' : 'Ended without bids.')];
  }

  minimumBid() {
    const auction = this.auction;
    return auction.leader ? auction.current_price + auction.min_increment : auction.starting_price;
  }

  updateBidArea(money) {
    const auction = this.auction;
    // Rebuilt only when what it offers changes, so typing and messages stay.
    const seller = isMe(auction.seller);
    const state = `${auction.status}|${Boolean(session.user)}|${seller}|${seller && auction.bid_count > 0}`;
    if (state !== this.bidState) {
      this.bidState = state;
      this.bidArea.replaceChildren(...this.bidAreaParts());
    }
    if (this.minHint) {
      this.minHint.textContent = isMe(auction.leader)
        ? `You are the highest bidder${this.yourMax ? `, with a maximum of ${money(this.yourMax)}` : ''}. To go higher, raise your maximum.`
        : `Minimum bid: ${money(this.minimumBid())}`;
      if (!this.amountEdited) this.amountInput.value = moneyInput(this.minimumBid(), auction.currency);
    }
  }

  bidAreaParts() {
    const auction = this.auction;
    this.minHint = null;
    if (auction.status !== 'active' && auction.status !== 'scheduled') {
      return [h('h2', {}, 'Bidding is closed'), h('p', {}, auction.status === 'cancelled' ? 'This auction was cancelled.' : 'This auction has ended.')];
    }
    if (isMe(auction.seller)) {
      const parts = [h('h2', {}, 'Your auction'), h('p', {}, 'You are the seller, so you cannot bid here. Share this page’s address with bidders.')];
      if (auction.bid_count === 0) parts.push(this.cancelButton());
      return parts;
    }
    if (!session.user) return [authForm()];
    if (auction.status === 'scheduled') return [h('h2', {}, 'Bidding opens soon'), h('p', {}, 'You can bid once the auction starts.')];
    const currency = auction.currency;
    this.amountInput = h('input', { type: 'text', inputmode: 'decimal', autocomplete: 'off', required: true });
    const maxInput = h('input', { type: 'text', inputmode: 'decimal', autocomplete: 'off' });
    this.minHint = h('span', {});
    const message = h('p', { class: 'message', id: 'bid-message', role: 'status', 'aria-live': 'polite' });
    const submit = h('button', { type: 'submit', id: 'bid-submit' }, 'Place bid');
    this.amountEdited = false;
    this.amountInput.addEventListener('input', () => {
      this.amountEdited = this.amountInput.value.trim() !== '';
    });
    const form = h('form', { class: 'bid-form', novalidate: true, 'aria-labelledby': 'bid-title' },
      h('h2', { id: 'bid-title' }, 'Place a bid'),
      field('bid-amount', `Your bid (${currency})`, this.amountInput, this.minHint),
      field('bid-max', `Maximum for automatic bidding (${currency}, optional)`, maxInput, 'We bid for you, one increment at a time, up to this amount. Others never see it.'),
      h('div', { class: 'actions' }, submit),
      message);
    form.addEventListener('submit', (event) => {
      event.preventDefault();
      this.placeBid(maxInput, submit, message);
    });
    return [form];
  }

  cancelButton() {
    const message = h('p', { class: 'message', role: 'status', 'aria-live': 'polite' });
    const button = h('button', { type: 'button', class: 'secondary' }, 'Cancel auction');
    button.addEventListener('click', async () => {
      button.disabled = true;
      try {
        this.auction = await api('POST', `/api/v1/auctions/${this.id}/cancel`, undefined, newKey());
        this.update();
      } catch (failure) {
        button.disabled = false;
        setMessage(message, 'error', failure.code === 'AUCTION_HAS_BIDS' ? 'It has bids now, so it can no longer be cancelled.' : failure.message);
      }
    });
    return h('div', {}, button, message);
  }

  async placeBid(maxInput, submit, message) {
    const auction = this.auction;
    const currency = auction.currency;
    const amount = parseMoney(this.amountInput.value, currency);
    const max = maxInput.value.trim() === '' ? { value: undefined } : parseMoney(maxInput.value, currency);
    setFieldError(this.amountInput, amount.error);
    setFieldError(maxInput, max.error);
    if (amount.error || max.error) {
      (amount.error ? this.amountInput : maxInput).focus();
      setMessage(message, '', '');
      return;
    }
    if (max.value !== undefined && max.value < amount.value) {
      setFieldError(maxInput, 'Your maximum must be at least your bid.');
      maxInput.focus();
      return;
    }
    const body = { amount: amount.value };
    if (max.value !== undefined) body.max_amount = max.value;
    // The same bid sent again after an unknown outcome keeps its key, so it
    // cannot count twice.
    const fingerprint = JSON.stringify(body);
    if (!this.pendingKey || this.pendingKey.fingerprint !== fingerprint) this.pendingKey = { fingerprint, key: newKey() };
    submit.disabled = true;
    setMessage(message, 'pending', 'Placing your bid…');
    try {
      const result = await api('POST', `/api/v1/auctions/${this.id}/bids`, body, this.pendingKey.key);
      this.pendingKey = null;
      this.yourMax = result.your_max;
      if (this.outbidAlert) this.outbidAlert.remove();
      // Live events bring the bid anyway; without them, show it at once.
      if (live.state !== 'live' && result.seq === this.auction.seq + 1) this.onMessage({ type: 'bid', ...result, reserve_met: this.auction.reserve_met });
      this.amountEdited = false;
      maxInput.value = '';
      this.update();
      setMessage(message, result.leading ? 'success' : 'warning', result.leading
        ? `Your bid is in. You are the highest bidder at ${formatMoney(result.current_price, currency)}.`
        : `Your bid is in, but another bidder’s maximum is higher. The price is now ${formatMoney(result.current_price, currency)}.`);
    } catch (failure) {
      if (!(failure.code === 'NETWORK' || failure.details.outcome === 'unknown')) this.pendingKey = null;
      setMessage(message, 'error', bidErrorText(failure, auction));
      if (failure.code === 'BID_TOO_LOW' && typeof failure.details.min_bid === 'number') {
        this.amountEdited = false;
        this.amountInput.value = moneyInput(failure.details.min_bid, currency);
      }
    } finally {
      submit.disabled = false;
    }
  }
}

/** Rows of both lists, one per seq, newest first, at most HISTORY_ROWS. */
function mergeHistory(shown, more) {
  const bySeq = new Map();
  for (const row of [...shown, ...more]) bySeq.set(row.seq, row);
  return [...bySeq.values()].sort((a, b) => b.seq - a.seq).slice(0, HISTORY_ROWS);
}

function historyRow(item) {
  return { seq: item.seq, price: item.current_price, leader: item.leader, placedAt: item.placed_at };
}

/** A sentence for every rejection a bid can get (docs/API.md). */
function bidErrorText(failure, auction) {
  const money = (minor) => formatMoney(minor, auction.currency);
  const details = failure.details || {};
  switch (failure.code) {
    case 'BID_TOO_LOW':
      return `Your bid is too low. The minimum bid is ${money(details.min_bid)}.`;
    case 'ALREADY_LEADING':
      return 'You are already the highest bidder. To bid more, enter a maximum above your current one.';
    case 'AUCTION_NOT_ACTIVE':
      return {
        scheduled: 'This auction has not started yet.',
        ended: 'This auction has ended; bids are closed.',
        cancelled: 'This auction was cancelled.',
      }[details.status] || 'This auction is not taking bids.';
    case 'SELLER_CANNOT_BID':
      return 'You are the seller, so you cannot bid on your own auction.';
    case 'INVALID_AMOUNT':
      return `That amount cannot be used: ${failure.message}`;
    case 'AUCTION_NOT_FOUND':
      return 'This auction no longer exists.';
    case 'RATE_LIMITED': {
      const wait = details.retry_after_secs || failure.retryAfter || 1;
      return `You are bidding too fast. Try again in ${wait} s.`;
    }
    case 'UNAVAILABLE':
      return details.outcome === 'unknown'
        ? 'We could not confirm your bid in time. It may still count: press Place bid again with the same amount to find out.'
        : 'The server cannot take bids at the moment; your bid was not placed. Try again shortly.';
    case 'UNAUTHENTICATED':
      return 'Your session has ended. Sign in again to bid.';
    case 'IDEMPOTENCY_KEY_REUSED':
      return 'This bid clashed with an earlier one. Press Place bid again.';
    case 'NETWORK':
      return 'Could not reach the server, so your bid is not confirmed. Press Place bid again to retry safely.';
    case 'INVALID_REQUEST':
      return `The bid was not understood: ${failure.message}`;
    default:
      return failure.message;
  }
}

// ------------------------------------------------------------------- boot

renderAccount();
live.start();
render();
