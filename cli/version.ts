/** Replaced at build time by esbuild's define; the package version in development. */
declare const __FLEETLET_VERSION__: string | undefined;
export const VERSION: string = typeof __FLEETLET_VERSION__ === 'string' ? __FLEETLET_VERSION__ : '0.1.0-dev';
