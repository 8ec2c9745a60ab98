// Types for bundle-scan.mjs, so strict TypeScript tests can import it.
export interface ScanFinding {
  spec: string;
  count: number;
  offset: number;
}
export interface ScanResult {
  nonBuiltin: ScanFinding[];
  dynamicCount: number;
}
export function isBuiltin(spec: string): boolean;
export function scanBundle(text: string): ScanResult;
export function describeFinding(text: string, finding: ScanFinding): string;
