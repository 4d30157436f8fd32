// Tip animations that grow with the amount: a bigger tip gets a bigger badge,
// more coins flying further and a longer show. With reduced motion the badge
// only fades in and out, without coins.

const reduced = window.matchMedia("(prefers-reduced-motion: reduce)");
const LAYER_NODES_MAX = 150; // badges and coins on screen at once

/** 0 (under 10) to 4 (1000 and more). */
export function level(amount) {
  if (amount >= 1000) return 4;
  if (amount >= 100) return 3;
  if (amount >= 50) return 2;
  if (amount >= 10) return 1;
  return 0;
}

function coinSpan(className) {
  const coin = document.createElement("span");
  coin.className = className;
  coin.setAttribute("aria-hidden", "true");
  return coin;
}

/** `label`: what was tipped for (a menu item's label), shown under the name. */
export function burst(layer, amount, from, label = "") {
  const lvl = level(amount);
  const scale = 1 + Math.min(1.6, Math.log10(Math.max(1, amount)) * 0.45);
  const duration = 1600 + lvl * 500;
  const x = 30 + Math.random() * 40; // percent of the stage's width

  while (layer.children.length >= LAYER_NODES_MAX) layer.firstElementChild.remove();

  const badge = document.createElement("div");
  badge.className = `burst level-${lvl}`;
  badge.style.setProperty("--scale", scale.toFixed(2));
  badge.style.setProperty("--x", `${x}%`);
  badge.style.setProperty("--dur", `${duration}ms`);
  const figure = document.createElement("span");
  figure.className = "burst-amount";
  figure.append(coinSpan("coin"), ` +${amount.toLocaleString()}`);
  const who = document.createElement("span");
  who.className = "burst-from";
  who.textContent = from;
  badge.append(figure, who);
  if (label) {
    const item = document.createElement("span");
    item.className = "burst-item";
    item.textContent = label;
    badge.append(item);
  }
  layer.append(badge);
  const dropBadge = () => badge.remove();
  badge.addEventListener("animationend", dropBadge);
  setTimeout(dropBadge, duration + 400); // when animations are off

  if (reduced.matches) return;
  const coins = Math.min(36, Math.round(Math.log2(amount + 1) * (1.5 + lvl)));
  for (let i = 0; i < coins; i += 1) {
    const coin = coinSpan("coin coin-fx");
    const angle = Math.random() * Math.PI; // upwards half circle
    const reach = (50 + Math.random() * 90) * scale;
    coin.style.setProperty("--x", `${x}%`);
    coin.style.setProperty("--dx", `${Math.cos(angle) * reach}px`);
    coin.style.setProperty("--dy", `${-Math.sin(angle) * reach}px`);
    coin.style.setProperty("--delay", `${Math.round(Math.random() * 300)}ms`);
    coin.style.setProperty("--dur", `${900 + lvl * 250}ms`);
    layer.append(coin);
    const drop = () => coin.remove();
    coin.addEventListener("animationend", drop);
    setTimeout(drop, 2500 + lvl * 300);
  }
}
