/**
 * Public API of bundles/ for the agent's updater, the gateway and the CLI.
 * Format and guarantees: docs/bundle-format.md. Error codes: FLEET_BUNDLE_* in core/errors.ts.
 */
export {
  BUNDLE_KINDS,
  MAX_MANIFEST_BYTES,
  MAGIC,
  canonicalJson,
  encodePrefix,
  encodeTail,
  pathProblem,
  compareVersions,
  type BundleKind,
  type BundleManifest,
  type BundleFile,
  type ManifestInput,
  type SignatureEntry,
} from './format.ts';
export {
  loadTrustRoot,
  parseTrustRoot,
  updateTrustRoot,
  verifyRootChain,
  saveTrustRoot,
  createRootBytes,
  trustRootOfKeys,
  keyIdOf,
  rawPublicKey,
  publicKeyFromRaw,
  type TrustRoot,
  type RootSigned,
} from './trust.ts';
export { verifyBundle, checkManifestSignatures, type VerifiedBundle, type VerifyOptions, type DeviceFacts } from './verify.ts';
export { buildBundle, signManifest, signBundle, inspectBundle, encodeManifest, type BuildOptions, type BuildSource, type BuiltBundle, type BundleInfo } from './build.ts';
export { generateKeyFiles, loadPrivateKey, loadPublicKey, signBytes, verifyBytes } from './sign.ts';
