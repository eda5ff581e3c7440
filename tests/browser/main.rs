//! Browser tests of the ops console: real headless Chromium through chromedriver.
