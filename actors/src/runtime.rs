//! A tokio runtime owned by a value (the node's commit thread, the WebSocket
//! hub's fan-out threads): dropped from anywhere, even async code, where
//! dropping a `Runtime` itself would panic, it stops in the background.

pub struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    pub fn new(runtime: tokio::runtime::Runtime) -> OwnedRuntime {
        OwnedRuntime(Some(runtime))
    }

    /// Runs `future` on this runtime.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.as_ref().expect("taken only when dropped").spawn(future)
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
