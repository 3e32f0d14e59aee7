//! `http::ROUTES` is the pod's router: every listed route exists (with its token it is
//! answered by its handler, not by the fallbacks), every `Token` route refuses a request
//! without the token or with a wrong one, and the `Public` ones need none. Unlisted routes
//! cannot be mounted (`app` debug-asserts), so a new route is covered by being listed.

mod common;

use common::{Pod, PodOptions, TOKEN, error_code, split};
use reqwest::Method;
use wa_session::http::{Access, ROUTES};

fn concrete(path: &str) -> String {
    path.replace("{id}", "3EB0000000000000000000")
}

#[tokio::test]
async fn every_listed_route_exists_and_token_routes_refuse_without_the_token() {
    let pod = Pod::start(PodOptions::sandbox()).await;
    assert!(ROUTES.len() >= 13, "{ROUTES:?}");
    for route in ROUTES {
        let method = Method::from_bytes(route.method.as_bytes()).unwrap();
        let url = pod.url(&concrete(route.path));
        let what = format!("{} {}", route.method, route.path);
        for auth in [None, Some("Bearer wrong-token"), Some("Basic dGVzdA=="), Some(format!("Bearer {TOKEN}x").as_str())] {
            let mut req = pod.client.request(method.clone(), &url);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let (status, body) = split(req.send().await.unwrap()).await;
            match route.access {
                Access::Token => {
                    assert_eq!(status.as_u16(), 401, "{what} with {auth:?}: {body}");
                    assert_eq!(error_code(&body), "UNAUTHORIZED", "{what}: {body}");
                }
                Access::Public => assert_eq!(status.as_u16(), 200, "{what} with {auth:?}: {body}"),
            }
        }
        // With the token: the route's own handler answers (not "no such route", not 405).
        let (status, body) = split(pod.client.request(method.clone(), &url).bearer_auth(TOKEN).send().await.unwrap()).await;
        assert_ne!(status.as_u16(), 401, "{what} refuses the right token: {body}");
        assert_ne!(status.as_u16(), 405, "{what} is listed with the wrong method: {body}");
        assert!(
            !(status.as_u16() == 404 && error_code(&body) == "NOT_FOUND"),
            "{what} is listed but not routed: {body}"
        );
    }
    // And what is not listed is not there, token or not.
    for path in ["/v1/admin", "/v1/sandbox", "/debug/vars", "/v1/messages/x/y"] {
        let (status, body) = split(pod.client.get(pod.url(path)).bearer_auth(TOKEN).send().await.unwrap()).await;
        assert_eq!((status.as_u16(), error_code(&body)), (404, "NOT_FOUND"), "{path}: {body}");
    }
}
