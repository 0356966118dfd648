// The API-key panel now lives in page.js with the rest of the pages' shared code; this
// module stays for docs.js (the /docs page), which imports storedKey from it.

export { askForKey, bindKeyPanel, storedKey } from "./page.js";
