// Regenerates the table in docs/errors.md from core/errors.ts: node --import tsx scripts/gen-errors-doc.ts
import { readFileSync, writeFileSync } from 'node:fs';
import { ERROR_CODES } from '../core/errors.ts';

const file = new URL('../docs/errors.md', import.meta.url);
const doc = readFileSync(file, 'utf8');
const table = ['| code | meaning |', '|---|---|', ...Object.entries(ERROR_CODES).map(([c, m]) => `| \`${c}\` | ${m} |`)].join('\n');
writeFileSync(file, doc.replace(/<!-- codes:start -->[\s\S]*<!-- codes:end -->/, `<!-- codes:start -->\n${table}\n<!-- codes:end -->`));
