// The API-key panel of the console and the dashboard: one key, kept in localStorage,
// shared by both pages.

const KEY_STORE = "pushsvc.apiKey";
const $ = (id) => document.getElementById(id);

export function storedKey() {
  try {
    return localStorage.getItem(KEY_STORE) || null;
  } catch {
    return null;
  }
}

// Fill the field with the stored key; on submit, store the new one and call onSave(key).
export function bindKeyPanel(onSave) {
  $("api-key").value = storedKey() || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    try {
      if (key) localStorage.setItem(KEY_STORE, key);
      else localStorage.removeItem(KEY_STORE);
    } catch {
      // kept for this page only
    }
    $("key-note").textContent = key ? "Saved." : "Cleared.";
    onSave(key || null);
  });
}

// Open the panel and say why a key is needed.
export function askForKey(message) {
  $("key-panel").open = true;
  $("key-note").textContent = message;
  $("api-key").focus();
}
